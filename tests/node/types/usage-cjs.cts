// The CommonJS view of the same declarations: `require('ratewarden')`.
import rw = require('ratewarden');

const warden: rw.Warden = new rw.Warden({ scopes: {} });
const pending: Promise<rw.Decision> = warden.check('ip:1');
export = pending;
