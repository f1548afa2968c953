// ES module entry point: re-exports the API of index.cjs.
import api from './index.cjs';

export const {
  Warden,
  Listener,
  ManualClock,
  scope,
  currentCaps,
  retryDelay,
  parseHeaders,
  signWebhook,
  governOpenAI,
  version,
  WardenError,
  PolicyError,
  InvalidInputError,
  BackendError,
  ReservationNotFoundError,
  ReservationExpiredError,
  ReservationConflictError,
  RateLimitedError,
  BudgetExceededError,
} = api;
export default api;
