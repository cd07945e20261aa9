/**
 * The entry of the step-process startup snapshot (`node --build-snapshot`, see build-runner.ts):
 * node, apache-arrow and the runner are deserialized ready, instead of compiled and run at every
 * step process's start. The runner's main runs once the process is up.
 * Arrow is kept on globalThis for the shim module linked pipeline code imports (build-runner.ts).
 */
import * as arrow from 'apache-arrow';
import { startupSnapshot } from 'node:v8';
import { IN_STEP_SNAPSHOT, SNAPSHOT_ARROW } from './code-import.ts';
import { main } from './runner.ts';

Object.assign(globalThis, { [SNAPSHOT_ARROW]: arrow });
if (startupSnapshot.isBuildingSnapshot()) {
  Object.assign(globalThis, { [IN_STEP_SNAPSHOT]: true });
  startupSnapshot.setDeserializeMainFunction(main);
}
// Run as a plain script instead (a step whose heap limit is not the snapshot's), the runner has
// started itself already, and imports pipeline code as usual.
