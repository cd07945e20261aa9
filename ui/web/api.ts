import type { LiveMessage } from '../hub.ts';

/** What the server said when a request failed, shown to the user as is. */
export class ApiError extends Error {
  override readonly name = 'ApiError';
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

async function answer<T>(res: Response): Promise<T> {
  const text = await res.text();
  let body: unknown = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = { error: text };
  }
  if (!res.ok) throw new ApiError(res.status, (body as { error?: string } | null)?.error ?? `HTTP ${res.status}`);
  return body as T;
}

export async function getJson<T>(path: string): Promise<T> {
  return answer<T>(await fetch(path, { credentials: 'same-origin' }));
}

export async function postJson<T>(path: string, body: unknown = {}): Promise<T> {
  return answer<T>(await fetch(path, { method: 'POST', credentials: 'same-origin', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) }));
}

/**
 * Follows the server's live stream. EventSource reconnects by itself; `onOpen` lets a page read
 * its state again each time the stream (re)opens, since messages sent before it were not heard.
 */
export function follow(query: string, onMessage: (m: LiveMessage) => void, onOpen: () => void): () => void {
  const source = new EventSource(`/api/events?${query}`);
  source.onmessage = (e) => onMessage(JSON.parse(e.data as string) as LiveMessage);
  // On every open, the first one too: a page's first read may have raced the stream's start.
  source.onopen = () => onOpen();
  return () => source.close();
}
