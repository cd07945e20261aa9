import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';
import { UiBundleError } from './errors.ts';

/** The browser code, bundled once per process: everything the page loads comes from this server, nothing from a CDN. */
export interface UiBundle {
  js: string;
  css: string;
}

const entry = fileURLToPath(new URL('./web/main.ts', import.meta.url));
let bundled: Promise<UiBundle> | null = null;

export function uiBundle(): Promise<UiBundle> {
  bundled ??= bundleNow().catch((error: unknown) => {
    bundled = null;
    throw new UiBundleError(`could not bundle the UI from ${entry}: ${(error as Error).message}`);
  });
  return bundled;
}

async function bundleNow(): Promise<UiBundle> {
  const result = await build({
    entryPoints: [entry],
    bundle: true,
    write: false,
    format: 'esm',
    platform: 'browser',
    target: 'es2022',
    minify: true,
    outdir: 'out',
    logLevel: 'silent',
    legalComments: 'none',
  });
  const js = result.outputFiles.find((f) => f.path.endsWith('.js'));
  const css = result.outputFiles.find((f) => f.path.endsWith('.css'));
  if (!js) throw new Error('esbuild produced no JavaScript');
  return { js: js.text, css: css?.text ?? '' };
}

export const INDEX_HTML = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Quiver</title>
<link rel="stylesheet" href="/app.css">
</head>
<body>
<div id="app"></div>
<script type="module" src="/app.js"></script>
</body>
</html>
`;
