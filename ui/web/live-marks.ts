/**
 * When each step state reached the page, kept on `window.__quiver` so a test (or a person with
 * the console) can compare it with when the state changed in the cluster.
 */
interface Marks {
  loadedAt: number;
  states: { step: string; state: string; at: number }[];
}

declare global {
  interface Window {
    __quiver?: Marks;
  }
}

export function marks(): Marks {
  return (window.__quiver ??= { loadedAt: Date.now(), states: [] });
}

export function recordState(step: string, state: string): void {
  const m = marks();
  m.states.push({ step, state, at: Date.now() });
  if (m.states.length > 10_000) m.states.splice(0, 5_000);
}
