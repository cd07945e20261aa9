import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { after, describe, it } from 'node:test';
import { fixture, quiverBin, repoRoot, runCli, tempHome } from './helpers.ts';

const home = tempHome();
after(() => home.remove());
const env = { QUIVER_HOME: home.dir };

describe('quiver run', () => {
  it('runs the example on the embedded default and prints the JSON contract', async () => {
    const { code, stdout, stderr } = await runCli(['run', fixture('transactions-generated.ts'), '--json', '--params', 'rows=50000'], { env });
    assert.equal(code, 0, stderr);
    const result = JSON.parse(stdout) as {
      runId: string;
      state: string;
      steps: { name: string; state: string; rows: number; bytes: number; transport: string | null; copiedBytes: number; durationMs: number }[];
    };
    assert.match(result.runId, /^[0-9A-Z]{26}$/);
    assert.equal(result.state, 'succeeded');
    assert.deepEqual(
      result.steps.map((s) => [s.name, s.state]),
      [
        ['transactions', 'succeeded'],
        ['euro_selection', 'succeeded'],
        ['usd_by_country', 'succeeded'],
      ],
    );
    const [transactions, euro] = result.steps;
    assert.equal(transactions!.rows, 50_000);
    assert.equal(transactions!.transport, null);
    assert.equal(euro!.transport, 'shm');
    // The child read its input in place: the only bytes copied are its own output's.
    assert.equal(euro!.copiedBytes, euro!.bytes);
    assert.ok(result.steps.every((s) => s.durationMs >= 0));
    // The live view went to stderr, step logs prefixed with the step's name.
    assert.match(stderr, /transactions\s+│ generated 50,000 transactions/);
  });

  it('shows live states, a summary and a preview of the final table', async () => {
    const { code, stdout } = await runCli(['run', fixture('transactions-generated.ts'), '--params', 'rows=20000'], { env });
    assert.equal(code, 0, stdout);
    assert.match(stdout, /euro_selection\s+● running/);
    assert.match(stdout, /step\s+state\s+isolation\s+rows\s+bytes\s+transport\s+copied\s+time/);
    assert.match(stdout, /usd_by_country:\ncountry\s+usd\s+transactions/);
    assert.match(stdout, /run succeeded/);
  });

  it('exits 1 with the step error and stack when a step throws', async () => {
    const { code, stdout, stderr } = await runCli(['run', fixture('failing.ts'), '--json'], { env });
    assert.equal(code, 1);
    const result = JSON.parse(stdout) as { state: string; steps: { name: string; state: string; error?: { message: string } }[] };
    assert.equal(result.state, 'failed');
    assert.equal(result.steps.find((s) => s.name === 'broken')?.error?.message, 'the sensor file is corrupt at line 42');
    assert.equal(result.steps.find((s) => s.name === 'after_broken')?.state, 'skipped');
    assert.match(stderr, /at explode/);
  });

  it('rejects a bad plan before anything runs', async () => {
    const { code, stdout, stderr } = await runCli(['run', fixture('cycle.ts')], { env });
    assert.equal(code, 2);
    assert.equal(stdout, '');
    assert.match(stderr, /form a cycle/);
  });

  it('explains a bad command line', async () => {
    const { code, stderr } = await runCli(['run', fixture('transactions-generated.ts'), '--params', 'rows'], { env });
    assert.equal(code, 2);
    assert.match(stderr, /--params takes key=value, got "rows"/);
  });
});

describe('quiver run, interrupted', () => {
  it('cancels the run on Ctrl-C and exits 1 with the steps cancelled', async () => {
    const child = spawn(process.execPath, [quiverBin, 'run', fixture('slow.ts'), '--json', '--params', 'sleepMs=60000'], {
      cwd: repoRoot,
      env: { ...process.env, ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => {
      stderr += d;
      if (d.includes('slow step started')) child.kill('SIGINT');
    });
    const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
    assert.equal(code, 1, stderr);
    const result = JSON.parse(stdout) as { state: string; steps: { name: string; state: string }[] };
    assert.equal(result.state, 'cancelled');
    assert.deepEqual(
      result.steps.map((s) => s.state),
      ['succeeded', 'cancelled', 'cancelled'],
    );
    assert.match(stderr, /cancelling the run/);
  });
});

describe('quiver COMMAND --help', () => {
  it('answers every command with its own usage, and an unknown one with an error', async () => {
    for (const command of ['run', 'deploy', 'publish', 'rerun', 'cancel', 'release', 'table', 'ui']) {
      const { code, stdout, stderr } = await runCli([command, '--help'], { env, timeoutMs: 30_000 });
      assert.equal(code, 0, `quiver ${command} --help: ${stderr}`);
      assert.match(stdout, new RegExp(`^Usage: quiver ${command} `), stdout);
      assert.match(stdout, new RegExp(`\\n  ${command}( |\\n)`), `quiver ${command} --help shows its own lines`);
      assert.doesNotMatch(stdout, /\n {2}orchestrator /, `quiver ${command} --help shows only its own lines`);
    }
    const unknown = await runCli(['frobnicate', '--help'], { env, timeoutMs: 30_000 });
    assert.equal(unknown.code, 2);
    assert.match(unknown.stderr, /unknown command "frobnicate"/);
  });
});
