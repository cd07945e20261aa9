export { startUiServer, type UiServer } from './server.ts';
export { DEFAULT_UI_HOST, DEFAULT_UI_PORT, isLoopback, resolveUiOptions, type UiOptions } from './options.ts';
export { UiBundleError, UiOptionError, UiTokenRequiredError } from './errors.ts';
