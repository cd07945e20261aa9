/** The UI would listen beyond loopback without a token: anyone who reaches the port could drive the cluster. */
export class UiTokenRequiredError extends Error {
  override readonly name = 'UiTokenRequiredError';
  readonly code = 'ERR_UI_TOKEN_REQUIRED';
}

/** An option of the UI server that cannot be used as given. */
export class UiOptionError extends Error {
  override readonly name = 'UiOptionError';
  readonly code = 'ERR_UI_OPTION';
}

/** The browser code could not be bundled (a broken install or a bad edit under ui/web). */
export class UiBundleError extends Error {
  override readonly name = 'UiBundleError';
  readonly code = 'ERR_UI_BUNDLE';
}

/** A request the API answers with a status other than 200: the message is shown to the user. */
export class HttpError extends Error {
  override readonly name = 'HttpError';
  readonly code = 'ERR_UI_HTTP';
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}
