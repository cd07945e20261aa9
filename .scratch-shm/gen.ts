import { generateTransactions } from '../examples/transactions/data.ts';
let s = performance.now();
const t = generateTransactions(10_000_000);
console.log('10M gen s', ((performance.now() - s) / 1000).toFixed(2), t.numRows, t.batches.length, t.schema.fields.map(f => `${f.name}:${f.type}`));
console.log(t.slice(0, 3).toArray().map(r => r.toJSON()), t.get(9_999_999)?.toJSON());
const a = generateTransactions(1000, 7), b = generateTransactions(1000, 7), c = generateTransactions(1000, 8);
console.log(JSON.stringify(a.toArray()) === JSON.stringify(b.toArray()), JSON.stringify(a.toArray()) === JSON.stringify(c.toArray()));
console.log(generateTransactions(0).numRows, generateTransactions(0).schema.fields.length);
const et = t.getChild('eventTime')!; let min = Infinity, max = -Infinity; for (let i = 0; i < 1e5; i++) { const v = et.get(i) as number; if (v < min) min = v; if (v > max) max = v; }
console.log(new Date(min).toISOString(), new Date(max).toISOString(), typeof et.get(0));
