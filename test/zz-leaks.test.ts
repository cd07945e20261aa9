// Runs last (files run in name order, one at a time): whatever the suite started must be gone.
import assert from 'node:assert/strict';
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { it } from 'node:test';
import { liveStepProcesses } from './leak-markers.ts';
import { TEST_SHM_ROOT } from './helpers.ts';

it('leaves no Quiver segment in shared memory and no step process behind', () => {
  const leftovers: string[] = [];
  if (existsSync(TEST_SHM_ROOT)) {
    for (const cluster of readdirSync(TEST_SHM_ROOT)) {
      const walk = (dir: string): void => {
        for (const entry of readdirSync(dir, { withFileTypes: true })) {
          const path = join(dir, entry.name);
          leftovers.push(path);
          if (entry.isDirectory()) walk(path);
        }
      };
      leftovers.push(join(TEST_SHM_ROOT, cluster));
      walk(join(TEST_SHM_ROOT, cluster));
    }
  }
  assert.deepEqual(leftovers, []);
  assert.deepEqual(liveStepProcesses(), []);
});
