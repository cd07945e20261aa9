/** Where daemons report what they did and what they rejected. Injected; console by default. */
export interface Logger {
  info(message: string): void;
  warn(message: string): void;
  error(message: string): void;
}

export function consoleLogger(prefix: string): Logger {
  const stamp = () => new Date().toISOString().slice(11, 23);
  return {
    info: (m) => console.error(`${stamp()} ${prefix} ${m}`),
    warn: (m) => console.error(`${stamp()} ${prefix} warning: ${m}`),
    error: (m) => console.error(`${stamp()} ${prefix} error: ${m}`),
  };
}

export const silentLogger: Logger = { info() {}, warn() {}, error() {} };
