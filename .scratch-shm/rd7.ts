import { native } from '../shm/native.ts';
native.parentPid();
await new Promise((r) => setTimeout(r, 200));
console.log('BEFORE');
const s = performance.now();
const ab = native.openReadOnly('/dev/shm/qrd/' + process.argv[2]);
console.log('AFTER', (performance.now() - s).toFixed(2), ab.byteLength);
