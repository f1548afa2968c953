//! Node.js bindings for `ratewarden`, loaded by `bindings-node/index.cjs`.

use napi_derive::napi;

/// Return the version of the ratewarden core library.
#[napi]
pub fn version() -> &'static str {
    ratewarden::VERSION
}
