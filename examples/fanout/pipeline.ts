/**
 * One parent, three children: the parent's table is held once in shared memory and each child
 * maps it without copying.
 *
 *                ┌─▶ stats
 *   readings ────┼─▶ hottest
 *                └─▶ by_sensor
 */
import { tableFromArrays } from 'apache-arrow';
import { pipeline, step } from '../../sdk/index.ts';

export default pipeline('fanout', {
  readings: step((_inputs, ctx) => {
    const rows = Number(ctx.params.rows ?? 500_000);
    const sensor = new Int32Array(rows);
    const celsius = new Float64Array(rows);
    let seed = 7;
    for (let i = 0; i < rows; i++) {
      seed = (seed * 1103515245 + 12345) >>> 0;
      sensor[i] = seed % 16;
      celsius[i] = 15 + ((seed >>> 8) % 2000) / 100;
    }
    console.log(`read ${rows.toLocaleString('en-US')} readings`);
    return tableFromArrays({ sensor, celsius });
  }),

  stats: step({ r: 'readings' }, ({ r }, ctx) => {
    const celsius = r.getChild('celsius')!;
    let sum = 0;
    for (const v of celsius) sum += v as number;
    ctx.log(`input arrived without a copy: ${ctx.isZeroCopy(r)}`);
    return tableFromArrays({ rows: Int32Array.of(r.numRows), mean: Float64Array.of(r.numRows ? sum / r.numRows : 0) });
  }),

  hottest: step({ r: 'readings' }, ({ r }) => {
    const celsius = r.getChild('celsius')!;
    const sensor = r.getChild('sensor')!;
    let best = -Infinity;
    let at = -1;
    for (let i = 0; i < r.numRows; i++) {
      const v = celsius.get(i) as number;
      if (v > best) {
        best = v;
        at = i;
      }
    }
    return tableFromArrays({ sensor: Int32Array.of(at < 0 ? -1 : (sensor.get(at) as number)), celsius: Float64Array.of(best) });
  }),

  by_sensor: step({ r: 'readings' }, ({ r }) => {
    const counts = new Int32Array(16);
    for (const s of r.getChild('sensor')!) counts[s as number]!++;
    return tableFromArrays({ sensor: Int32Array.from({ length: 16 }, (_, i) => i), readings: counts });
  }),
});
