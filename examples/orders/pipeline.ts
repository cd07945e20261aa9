/**
 * An event-triggered pipeline: every `orders.uploaded` event starts a run that makes the batch of
 * orders the event names and totals it per country; a nightly schedule re-totals a large batch.
 *
 *   npx quiver up &
 *   npx quiver deploy examples/orders/pipeline.ts
 *   npx quiver publish orders.uploaded '{"batch": "2026-11-21", "orders": 50000}' --id batch-2026-11-21
 *   npx quiver runs
 */
import { tableFromArrays } from 'apache-arrow';
import { z } from 'zod';
import { pipeline, step } from '../../sdk/index.ts';
import { generateTransactions } from '../transactions/data.ts';

const upload = z.object({ batch: z.string().min(1), orders: z.number().int().positive().max(10_000_000) });

export default pipeline(
  'orders',
  {
    orders: step((_inputs, ctx) => {
      // Scheduled runs have no event: they take the nightly batch.
      const { batch, orders } = ctx.event ? upload.parse(ctx.event.payload) : { batch: 'nightly', orders: 1_000_000 };
      ctx.log(`batch ${batch}: ${orders} orders`);
      return generateTransactions(orders);
    }),
    totals: step({ orders: 'orders' }, ({ orders }) => {
      const country = orders.getChild('country')!;
      const usd = orders.getChild('usd')!;
      const sums = new Map<string, number>();
      for (let i = 0; i < orders.numRows; i++) {
        const c = String(country.get(i));
        sums.set(c, (sums.get(c) ?? 0) + Number(usd.get(i)));
      }
      const keys = [...sums.keys()].sort();
      return tableFromArrays({ country: keys, usd: Float64Array.from(keys.map((k) => sums.get(k)!)) });
    }),
  },
  {
    on: { event: 'orders.uploaded', schema: upload },
    schedule: { cron: '0 2 * * *', timezone: 'Europe/Rome', catchUp: 'latest', overlap: 'skip' },
    maxConcurrentRuns: 4,
  },
);
