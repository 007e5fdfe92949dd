// Runs tests/browser_chatjs.js (the scripted-server checks of chat.js) in
// node, without a browser or a server: `node tests/browser_chatjs_node.mjs`.
// The browser test runs the same file in Chromium; this is the quick loop.
import { readFileSync } from 'node:fs';

const here = new URL('.', import.meta.url);
const body = readFileSync(new URL('browser_chatjs.js', here), 'utf8');
const chatJs = new URL('../static/chat.js', here).href;
new Function(body)(chatJs, (results) => {
  for (const r of results) console.log(`${r.ok ? 'ok    ' : 'FAILED'} ${r.name}: ${r.detail}`);
  process.exit(results.length && results.every((r) => r.ok) ? 0 : 1);
});
