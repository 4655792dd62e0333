// web/lib/README.md's example, run as written: two pages that import only the library (no web/app) call each other
// and each shows the other's decoding video. If the README's code drifts from the library, this fails.
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { ROOT, e2e, uniqueRoom, until } from './helpers.mjs';

const t = e2e();

/** The first ```js block of web/lib/README.md. */
function readmeExample() {
  const md = readFileSync(path.join(ROOT, 'web/lib/README.md'), 'utf8');
  const m = md.match(/```js\n([\s\S]*?)```/);
  assert.ok(m, 'web/lib/README.md has a ```js example');
  return m[1];
}

describe('the browser library without our UI (web/lib/README.md)', () => {
  const server = t.server();
  /** @type {import('playwright-core').BrowserContext[]} */
  const contexts = [];
  after(async () => {
    await Promise.all(contexts.map((c) => c.close()));
  });

  /** A blank page of the server's origin running the README's module, its room renamed to `room`. */
  async function open(room, name) {
    // The server's CSP allows only its own scripts; the example is injected inline, so this context bypasses CSP.
    const context = await t.browser.newContext({ bypassCSP: true, permissions: ['camera', 'microphone'] });
    contexts.push(context);
    const page = await context.newPage();
    page.on('pageerror', (e) => console.error(`[${name}] uncaught:`, e.message));
    await page.goto(`${server.url}/`);
    await page.evaluate(() => {
      document.body.replaceChildren();
    });
    const code = readmeExample().replaceAll("'team'", `'${room}'`).replaceAll("'Alice'", `'${name}'`);
    await page.addScriptTag({ type: 'module', content: `${code}\nwindow.__call = call;` });
    return page;
  }

  it('two pages built on web/lib alone see and decode each other', async () => {
    const room = uniqueRoom('lib');
    const alice = await open(room, 'Alice');
    const bob = await open(room, 'Bob');
    for (const [page, other] of [
      [alice, bob],
      [bob, alice],
    ]) {
      // @ts-ignore
      const otherId = await until(other, () => window.__call?.id);
      // The example's `show` made a <video id=peer> playing the other's remoteStream: its time advances.
      const t0 = await until(
        page,
        (id) => {
          const v = document.getElementById(id);
          return v instanceof HTMLVideoElement && v.videoWidth > 0 && v.currentTime > 0 && v.currentTime;
        },
        otherId,
        30000,
      );
      await until(page, ({ id, t0 }) => /** @type {HTMLVideoElement} */ (document.getElementById(id)).currentTime > t0 + 0.5, {
        id: otherId,
        t0,
      });
      // @ts-ignore
      assert.equal(await page.evaluate((id) => window.__call.peers.get(id)?.name, otherId), other === alice ? 'Alice' : 'Bob');
    }
  });
});
