/**
 * Timing across processes for the benchmarks: publish (or send) in the bench's process, the step
 * function's first line in a step process. Both ends read CLOCK_MONOTONIC (`process.hrtime`),
 * the one clock every process on a host shares. Not the wall clock: this VM's is stepped against
 * the monotonic one (tens of ms a minute), and `performance.timeOrigin + performance.now()` is the
 * wall clock frozen at each process's start, so two long-lived processes disagreed by seconds.
 */
import { existsSync, readFileSync } from 'node:fs';

/** Monotonic milliseconds, sub-millisecond; comparable between processes of one host. */
export const monotonicMs = (): number => Number(process.hrtime.bigint()) / 1e6;

/**
 * Source of a step function's first line: appends `<label> <monotonic ns>` to `file`, where
 * `labelExpression` is a JavaScript template-literal body evaluated in the step (say
 * `${ctx.event?.id} first`). The step's module must import appendFileSync from node:fs.
 */
export function firstLineMark(file: string, labelExpression: string): string {
  return `appendFileSync(${JSON.stringify(file)}, \`${labelExpression} \${process.hrtime.bigint()}\\n\`);`;
}

/** A marks file read: each label with the monotonic milliseconds of every line that had it. */
export function readMarks(file: string): Map<string, number[]> {
  const marks = new Map<string, number[]>();
  const text = existsSync(file) ? readFileSync(file, 'utf8') : '';
  for (const line of text.split('\n')) {
    const at = line.lastIndexOf(' ');
    if (at <= 0) continue;
    const label = line.slice(0, at);
    const ms = Number(BigInt(line.slice(at + 1))) / 1e6;
    marks.set(label, [...(marks.get(label) ?? []), ms]);
  }
  return marks;
}
