//! The ratewarden command line.
fn main() {}
