'use strict';
// Public API of the lutstore Node client.
const { LutClient, LutError, RowSession, loadService, DEFAULT_PROTO } = require('./client');
const codec = require('./codec');

module.exports = { LutClient, LutError, RowSession, loadService, DEFAULT_PROTO, ...codec };
