// ES module entry point: re-exports the bindings loaded by index.cjs.
import native from './index.cjs';

export const { version } = native;
