import { createRequire } from 'node:module';
const n = createRequire(import.meta.url)('../shm/addon/build/Release/quiver_shm.node');
n.parentPid();
for (let i = 0; i < 5; i++) {
  let s = performance.now();
  const ab = n.openReadOnly('/dev/shm/qrd/x-0');
  const t1 = performance.now() - s;
  s = performance.now();
  n.unmap(ab);
  console.log('open', t1.toFixed(3), 'unmap', (performance.now() - s).toFixed(3));
}
