import * as shm from '../shm/index.ts';
shm.parentPid();
await new Promise((r) => setTimeout(r, 200));
const segs = JSON.parse(process.argv[2]);
function THE_READ_WINDOW() { return shm.readTableFromShm(segs, { dir: '/dev/shm/qrd' }); }
const s = performance.now(); const r = THE_READ_WINDOW(); const e = performance.now();
console.log('read ms', (e - s).toFixed(2), r.table.batches.length);
