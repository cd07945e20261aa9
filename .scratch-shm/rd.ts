import * as shm from '../shm/index.ts';
import { generateTransactions } from '../examples/transactions/data.ts';
const dir = '/dev/shm/qrd';
if (process.argv[2] === 'w') { shm.removeDir(dir); const w = shm.writeTableToShm(generateTransactions(Number(process.argv[3])), { dir, idPrefix: 'x' }); console.log(JSON.stringify(w.segments)); }
else {
  let s = performance.now(); shm.parentPid(); console.log('addon load', (performance.now() - s).toFixed(2));
  const segs = JSON.parse(process.argv[3]);
  for (let i = 0; i < 3; i++) { s = performance.now(); const r = shm.readTableFromShm(segs, { dir }); console.log('read', (performance.now() - s).toFixed(2), r.table.numRows); }
}
