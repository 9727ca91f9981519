"""Row formats both sides share: the encodings and row bytes (codec, nf4), the wire framing of
BatchGet answers (wire) and the protocol's names (protocol). Imports nothing else of lutstore's
but its errors."""
