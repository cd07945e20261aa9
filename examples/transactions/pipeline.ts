/**
 * The pipeline of Listing 1 in the Bauplan paper, in TypeScript: each step is a function from
 * named input tables to one table, and the DAG follows from the inputs.
 *
 *   (stored table) transactions ──▶ euro_selection ──▶ usd_by_country ──▶ (stored table)
 *
 * `transactions` is a stored table: create it once from generated data, then run:
 *
 *   npx quiver table generate-example --rows 1000000
 *   npx quiver run examples/transactions/pipeline.ts
 */
import { Float64, Int32, RecordBatch, Table, makeData, tableFromArrays, type Data, type Dictionary, type Utf8 } from 'apache-arrow';
import { pipeline, source, step } from '../../sdk/index.ts';
import { EUROPEAN_COUNTRIES } from './data.ts';

export default pipeline('transactions', {
  // Keeps European transactions. Reads only the columns it needs from the stored table (a scan
  // step fetches just those column chunks). Works on the column buffers directly (they are
  // views of shared memory), which is what makes it fast.
  euro_selection: step({ data: source('transactions', { columns: ['id', 'usd', 'country'] }) }, ({ data }) => {
    const european = new Set<string>(EUROPEAN_COUNTRIES);
    const batches: RecordBatch[] = [];
    for (const batch of data.batches) {
      const id = batch.getChild('id')!.data[0]!.values as Int32Array;
      const usd = batch.getChild('usd')!.data[0]!.values as Float64Array;
      const country = batch.getChild('country')!.data[0]! as Data<Dictionary<Utf8, Int32>>;
      const dictionary = country.dictionary!;
      // Decide once per dictionary entry, then compare integers per row.
      const keep = Uint8Array.from({ length: dictionary.length }, (_, i) => Number(european.has(dictionary.get(i)!)));
      const codes = country.values;
      let kept = 0;
      for (let i = 0; i < batch.numRows; i++) kept += keep[codes[i]!]!;
      const keptId = new Int32Array(kept);
      const keptUsd = new Float64Array(kept);
      const keptCodes = new Int32Array(kept);
      for (let i = 0, j = 0; i < batch.numRows; i++) {
        if (!keep[codes[i]!]) continue;
        keptId[j] = id[i]!;
        keptUsd[j] = usd[i]!;
        keptCodes[j++] = codes[i]!;
      }
      batches.push(
        new RecordBatch({
          id: makeData({ type: new Int32(), data: keptId }),
          usd: makeData({ type: new Float64(), data: keptUsd }),
          country: makeData({ type: country.type, data: keptCodes, dictionary }),
        }),
      );
    }
    const table = new Table(batches);
    console.log(`kept ${table.numRows.toLocaleString('en-US')} of ${data.numRows.toLocaleString('en-US')} rows`);
    return table;
  }),

  // Sums usd by country, and stores the result as the table usd_by_country once the run succeeded.
  usd_by_country: step({ data: 'euro_selection' }, ({ data }) => {
    const totals = new Map<string, { usd: number; count: number }>();
    for (const batch of data.batches) {
      const usd = batch.getChild('usd')!.data[0]!.values as Float64Array;
      const country = batch.getChild('country')!.data[0]! as Data<Dictionary<Utf8, Int32>>;
      const sums = new Float64Array(country.dictionary!.length);
      const counts = new Int32Array(country.dictionary!.length);
      for (let i = 0; i < batch.numRows; i++) {
        sums[country.values[i]!]! += usd[i]!;
        counts[country.values[i]!]!++;
      }
      for (let code = 0; code < sums.length; code++) {
        if (counts[code] === 0) continue;
        const name = country.dictionary!.get(code)!;
        const t = totals.get(name) ?? { usd: 0, count: 0 };
        t.usd += sums[code]!;
        t.count += counts[code]!;
        totals.set(name, t);
      }
    }
    const countries = [...totals.keys()].sort();
    return tableFromArrays({
      country: countries,
      usd: Float64Array.from(countries.map((c) => totals.get(c)!.usd)),
      transactions: Int32Array.from(countries.map((c) => totals.get(c)!.count)),
    });
  }, { materialize: true }),
});
