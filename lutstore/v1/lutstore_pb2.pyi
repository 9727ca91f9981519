from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    ENCODING_FP32: _ClassVar[Encoding]
    ENCODING_FP16: _ClassVar[Encoding]
    ENCODING_BF16: _ClassVar[Encoding]
    ENCODING_INT8: _ClassVar[Encoding]
    ENCODING_NF4: _ClassVar[Encoding]

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_NONE: _ClassVar[Compression]
    COMPRESSION_ZSTD: _ClassVar[Compression]
ENCODING_UNSPECIFIED: Encoding
ENCODING_FP32: Encoding
ENCODING_FP16: Encoding
ENCODING_BF16: Encoding
ENCODING_INT8: Encoding
ENCODING_NF4: Encoding
COMPRESSION_NONE: Compression
COMPRESSION_ZSTD: Compression

class ListTablesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTablesResponse(_message.Message):
    __slots__ = ("tables",)
    TABLES_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedCompositeFieldContainer[TableInfo]
    def __init__(self, tables: _Optional[_Iterable[_Union[TableInfo, _Mapping]]] = ...) -> None: ...

class GetTableInfoRequest(_message.Message):
    __slots__ = ("table", "version")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    table: str
    version: int
    def __init__(self, table: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ArtifactInfo(_message.Message):
    __slots__ = ("name", "size", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class TableInfo(_message.Message):
    __slots__ = ("name", "version", "vocab_size", "num_layers", "num_experts", "hidden_size", "encoding", "compression", "fingerprint", "artifacts", "row_bytes", "stored_bytes", "live_versions", "created_unix_ms", "source_form", "max_batch_rows", "shared_memory_socket", "block_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    ROW_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    LIVE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FORM_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_SOCKET_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    vocab_size: int
    num_layers: int
    num_experts: int
    hidden_size: int
    encoding: Encoding
    compression: Compression
    fingerprint: str
    artifacts: _containers.RepeatedCompositeFieldContainer[ArtifactInfo]
    row_bytes: int
    stored_bytes: int
    live_versions: _containers.RepeatedScalarFieldContainer[int]
    created_unix_ms: int
    source_form: str
    max_batch_rows: int
    shared_memory_socket: str
    block_size: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., vocab_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_experts: _Optional[int] = ..., hidden_size: _Optional[int] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., compression: _Optional[_Union[Compression, str]] = ..., fingerprint: _Optional[str] = ..., artifacts: _Optional[_Iterable[_Union[ArtifactInfo, _Mapping]]] = ..., row_bytes: _Optional[int] = ..., stored_bytes: _Optional[int] = ..., live_versions: _Optional[_Iterable[int]] = ..., created_unix_ms: _Optional[int] = ..., source_form: _Optional[str] = ..., max_batch_rows: _Optional[int] = ..., shared_memory_socket: _Optional[str] = ..., block_size: _Optional[int] = ...) -> None: ...

class BatchGetRequest(_message.Message):
    __slots__ = ("table", "version", "token_ids", "layer_ends")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LAYER_ENDS_FIELD_NUMBER: _ClassVar[int]
    table: str
    version: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    layer_ends: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, table: _Optional[str] = ..., version: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., layer_ends: _Optional[_Iterable[int]] = ...) -> None: ...

class Row(_message.Message):
    __slots__ = ("token_id", "data")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    data: bytes
    def __init__(self, token_id: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class BatchGetResponse(_message.Message):
    __slots__ = ("rows", "version", "layer_begin", "layer_end")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LAYER_BEGIN_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[Row]
    version: int
    layer_begin: int
    layer_end: int
    def __init__(self, rows: _Optional[_Iterable[_Union[Row, _Mapping]]] = ..., version: _Optional[int] = ..., layer_begin: _Optional[int] = ..., layer_end: _Optional[int] = ...) -> None: ...

class BatchGetSharedRequest(_message.Message):
    __slots__ = ("table", "version", "token_ids", "segment_name", "segment_bytes", "segment_handle")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    table: str
    version: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    segment_name: str
    segment_bytes: int
    segment_handle: str
    def __init__(self, table: _Optional[str] = ..., version: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., segment_name: _Optional[str] = ..., segment_bytes: _Optional[int] = ..., segment_handle: _Optional[str] = ...) -> None: ...

class BatchGetSharedResponse(_message.Message):
    __slots__ = ("version", "token_ids", "offsets", "lengths", "bytes_written")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    version: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    offsets: _containers.RepeatedScalarFieldContainer[int]
    lengths: _containers.RepeatedScalarFieldContainer[int]
    bytes_written: int
    def __init__(self, version: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., offsets: _Optional[_Iterable[int]] = ..., lengths: _Optional[_Iterable[int]] = ..., bytes_written: _Optional[int] = ...) -> None: ...

class GetArtifactRequest(_message.Message):
    __slots__ = ("table", "version", "name")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    table: str
    version: int
    name: str
    def __init__(self, table: _Optional[str] = ..., version: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class ArtifactChunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...
