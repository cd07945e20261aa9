/**
 * The pipeline of Listing 1 in the Bauplan paper, in TypeScript: each step is a function from
 * named input tables to one table, and the DAG follows from the inputs.
 *
 *   transactions ──▶ euro_selection ──▶ usd_by_country
 *
 * Run it with `npx quiver run examples/transactions/pipeline.ts --params rows=1000000`.
 */
import { Table, Utf8, makeVector, tableFromArrays, vectorFromArray } from 'apache-arrow';
import { input, pipeline, step } from '../../sdk/index.ts';
import { EUROPEAN_COUNTRIES, generateTransactions } from './data.ts';

export default pipeline('transactions', {
  // A source step: a seeded table of transactions (id, usd, country, eventTime).
  transactions: step((_inputs, ctx) => {
    const rows = Number(ctx.params.rows ?? 1_000_000);
    if (!Number.isInteger(rows) || rows < 0) throw new Error(`--params rows must be a whole number, got "${ctx.params.rows}"`);
    const table = generateTransactions(rows, Number(ctx.params.seed ?? 42));
    console.log(`generated ${table.numRows.toLocaleString('en-US')} transactions`);
    return table;
  }),

  // Keeps European transactions; asks its parent only for the columns it needs.
  euro_selection: step({ data: input('transactions', { columns: ['id', 'usd', 'country'] }) }, ({ data }) => {
    const european = new Set<string>(EUROPEAN_COUNTRIES);
    const ids: number[] = [];
    const usd: number[] = [];
    const country: string[] = [];
    for (const batch of data.batches) {
      const idColumn = batch.getChild('id')!;
      const usdColumn = batch.getChild('usd')!;
      const countryColumn = batch.getChild('country')!;
      for (let i = 0; i < batch.numRows; i++) {
        const c = countryColumn.get(i) as string | null;
        if (c === null || !european.has(c)) continue;
        ids.push(Number(idColumn.get(i)));
        usd.push(usdColumn.get(i) as number);
        country.push(c);
      }
    }
    console.log(`kept ${ids.length.toLocaleString('en-US')} of ${data.numRows.toLocaleString('en-US')} rows`);
    return new Table({
      id: makeVector(Int32Array.from(ids)),
      usd: makeVector(Float64Array.from(usd)),
      country: vectorFromArray(country, new Utf8()),
    });
  }),

  // Sums usd by country.
  usd_by_country: step({ data: 'euro_selection' }, ({ data }) => {
    const totals = new Map<string, { usd: number; count: number }>();
    for (const batch of data.batches) {
      const usdColumn = batch.getChild('usd')!;
      const countryColumn = batch.getChild('country')!;
      for (let i = 0; i < batch.numRows; i++) {
        const c = countryColumn.get(i) as string;
        const t = totals.get(c) ?? { usd: 0, count: 0 };
        t.usd += usdColumn.get(i) as number;
        t.count += 1;
        totals.set(c, t);
      }
    }
    const countries = [...totals.keys()].sort();
    return tableFromArrays({
      country: countries,
      usd: Float64Array.from(countries.map((c) => totals.get(c)!.usd)),
      transactions: Int32Array.from(countries.map((c) => totals.get(c)!.count)),
    });
  }),
});
