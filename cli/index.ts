export { main, runCli } from './main.ts';
