// The call page's own features: pre-join screen, rename, raise hand, participant list, pin, phones (every control
// reachable), accessibility (axe-core: no serious or critical violations; dialogs keep focus), screenshots of every
// view, and a signaling outage that does not end a call whose media still flows.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { axeViolations, connectedPeers, decodesVideoFrom, e2e, screenshot, snapshot, uniqueRoom, until } from './helpers.mjs';

const t = e2e();
const PHONE = { width: 390, height: 844 };
const PHONE_LANDSCAPE = { width: 844, height: 390 };

/** Waits for the pre-join screen with its Join button ready. @param {import('playwright-core').Page} p */
const prejoinReady = (p) => until(p, () => document.body.dataset.phase === 'prejoin' && !document.querySelector('#prejoin-join').disabled);

describe('pre-join screen and in-call controls', () => {
  const server = t.server();

  it('landing and pre-join pass axe; the pre-join preview, level meter, name memory, joining with camera and mic off', async () => {
    const home = await t.open(`${server.url}/`);
    assert.deepEqual(await axeViolations(home), []);
    await screenshot(home, 'landing.png');
    await home.context().close();

    const room = uniqueRoom('pre');
    const a = await t.open(`${server.url}/r/${room}`, { join: false });
    await prejoinReady(a);
    // The preview shows the camera; the meter moves with the (fake) microphone's sound.
    await until(a, () => /** @type {HTMLVideoElement} */ (document.querySelector('#pj-video')).videoWidth > 0);
    await until(a, () => /** @type {HTMLMeterElement} */ (document.querySelector('#pj-level')).value > 0.01);
    assert.ok((await a.$$eval('#pj-sel-audio option', (o) => o.length)) >= 1);
    assert.ok((await a.$$eval('#pj-sel-video option', (o) => o.length)) >= 1);
    assert.deepEqual(await axeViolations(a), []);
    await screenshot(a, 'prejoin.png');
    await a.fill('#pj-name', 'Quiet Person');
    await a.click('#pj-cam');
    await a.click('#pj-mic');
    // Camera off on the pre-join screen releases the camera at once.
    assert.equal((await snapshot(a)).tracks.camera, null);
    await a.click('#prejoin-join');
    await until(a, () => window.webcall.call.state === 'in-call');

    const b = await t.open(`${server.url}/r/${room}?name=Watcher`);
    const [aId] = await connectedPeers(b, 1);
    await until(b, (id) => {
      const tile = document.querySelector(`.tile[data-peer="${id}"]`);
      return tile?.dataset.video === 'off' && tile?.dataset.audio === 'off' && tile.querySelector('.name')?.textContent === 'Quiet Person';
    }, aId);
    // Screen readers hear the tile's state.
    assert.match(await b.getAttribute(`.tile[data-peer="${aId}"]`, 'aria-label'), /Quiet Person, microphone muted, camera off/);

    // The name is remembered: a new page in the same browser profile has it on its pre-join screen.
    const again = await a.context().newPage();
    await again.goto(`${server.url}/r/${uniqueRoom('other')}`);
    await prejoinReady(again);
    assert.equal(await again.inputValue('#pj-name'), 'Quiet Person');
    await again.close();
    await Promise.all([a, b].map((p) => p.context().close()));

    // On a phone, both ways up: the preview and every field, the Join button reachable.
    for (const [vp, file] of [
      [PHONE, 'prejoin-phone.png'],
      [PHONE_LANDSCAPE, 'prejoin-phone-landscape.png'],
    ]) {
      const p = await t.open(`${server.url}/r/${room}?name=Phone`, { join: false, viewport: vp });
      await prejoinReady(p);
      await until(p, () => /** @type {HTMLVideoElement} */ (document.querySelector('#pj-video')).videoWidth > 0);
      await screenshot(p, file);
      await p.locator('#prejoin-join').scrollIntoViewIfNeeded();
      assert.ok(await p.isVisible('#prejoin-join'));
      await p.context().close();
    }
  });

  it('rename, raise hand, participant list, pin, dialogs that keep focus, axe on the call with a dialog open', async () => {
    const room = uniqueRoom('ctl');
    const a = await t.open(`${server.url}/r/${room}?name=Ann`);
    await until(a, () => window.webcall.call.state === 'in-call');
    const b = await t.open(`${server.url}/r/${room}?name=Ben`);
    const [aId] = await connectedPeers(b, 1);
    const [bId] = await connectedPeers(a, 1);
    await decodesVideoFrom(b, aId);

    // Rename from the More menu: the other side sees the new name.
    await a.click('#btn-more');
    await a.click('#m-rename');
    assert.equal(await a.evaluate(() => document.activeElement?.id), 'overlay-input');
    // Tab stays inside the dialog.
    for (let i = 0; i < 6; i++) {
      await a.keyboard.press('Tab');
      assert.ok(await a.evaluate(() => !!document.activeElement?.closest('#overlay')), `focus left the dialog after ${i + 1} Tabs`);
    }
    assert.deepEqual(await axeViolations(a), []);
    await a.fill('#overlay-input', 'Annabel');
    await a.press('#overlay-input', 'Enter');
    await until(b, (id) => document.querySelector(`.tile[data-peer="${id}"] .name`)?.textContent === 'Annabel', aId);
    assert.match(await a.textContent('.tile.local .name'), /Annabel/);
    // Escape closes a dialog that may be closed, and focus goes back.
    await a.click('#btn-more');
    await a.click('#m-devices');
    await until(a, () => !document.querySelector('#devices').hidden && !!document.activeElement?.closest('#devices'));
    assert.deepEqual(await axeViolations(a), []);
    await a.keyboard.press('Escape');
    await until(a, () => document.querySelector('#devices').hidden);

    // Raise hand: the other side's tile and list show it.
    await a.click('#btn-hand');
    await until(b, (id) => document.querySelector(`.tile[data-peer="${id}"]`)?.dataset.hand === 'on', aId);
    await b.click('#btn-people');
    const list = await until(b, () => {
      const rows = [...document.querySelectorAll('#people-list li')].map((li) => li.textContent);
      return rows.length === 2 ? rows : false;
    });
    assert.ok(list.some((r) => /Annabel.*hand raised/.test(r)), JSON.stringify(list));
    assert.ok(list.some((r) => /Ben \(you\)/.test(r)), JSON.stringify(list));
    assert.deepEqual(await axeViolations(b), []);
    await a.click('#btn-hand');
    await until(b, (id) => document.querySelector(`.tile[data-peer="${id}"]`)?.dataset.hand === 'off', aId);

    // Pin: the pinned tile takes the stage.
    await b.click(`#people-list li[data-peer="${aId}"] button`);
    await until(b, (id) => document.querySelector('#grid').dataset.layout === 'spotlight' && document.querySelector(`.tile[data-peer="${id}"]`).classList.contains('spot'), aId);
    const big = await b.$eval(`.tile[data-peer="${aId}"]`, (el) => el.getBoundingClientRect().width);
    const small = await b.$eval('.tile.local', (el) => el.getBoundingClientRect().width);
    assert.ok(big > 2 * small, `${big} vs ${small}`);
    await screenshot(b, 'call-pinned.png');
    await b.click(`#people-list li[data-peer="${aId}"] button`);
    await until(b, () => !document.querySelector('#grid').dataset.layout);
    assert.ok(bId);
    await Promise.all([a, b].map((p) => p.context().close()));
  });

  it('four people: desktop grid centred, phone portrait and landscape use the screen, every control reachable', async () => {
    const room = uniqueRoom('four');
    const pages = [];
    for (const name of ['Ada', 'Bo', 'Cy', 'Di']) {
      const p = await t.open(`${server.url}/r/${room}?name=${name}`);
      await until(p, () => window.webcall?.call.state === 'in-call');
      pages.push(p);
    }
    for (const p of pages) await connectedPeers(p, 3, 30000);
    const [a, , , d] = pages;
    for (const id of await connectedPeers(a, 3)) await decodesVideoFrom(a, id, 5, 30000);
    // Desktop: the four tiles are centred in the stage (equal margins left and right).
    await a.waitForTimeout(300);
    const box = await a.evaluate(() => {
      const stage = document.querySelector('#stage').getBoundingClientRect();
      const tiles = [...document.querySelectorAll('.tile')].map((el) => el.getBoundingClientRect());
      const left = Math.min(...tiles.map((r) => r.left)) - stage.left;
      const right = stage.right - Math.max(...tiles.map((r) => r.right));
      return { left, right, count: tiles.length };
    });
    assert.equal(box.count, 4);
    assert.ok(Math.abs(box.left - box.right) < 4, JSON.stringify(box));
    assert.deepEqual(await axeViolations(a), []);
    await screenshot(a, 'call-4.png');

    for (const [vp, file] of [
      [PHONE, 'phone-portrait.png'],
      [PHONE_LANDSCAPE, 'phone-landscape.png'],
    ]) {
      await d.setViewportSize(vp);
      await d.waitForTimeout(300);
      // The tiles cover most of the stage (no large gaps).
      const use = await d.evaluate(() => {
        const stage = document.querySelector('#stage').getBoundingClientRect();
        const area = [...document.querySelectorAll('.tile:not(.offpage)')].reduce((s, el) => {
          const r = el.getBoundingClientRect();
          return s + r.width * r.height;
        }, 0);
        return area / (stage.width * stage.height);
      });
      assert.ok(use > 0.6, `tiles use ${Math.round(use * 100)} % of the stage at ${vp.width}×${vp.height}`);
      // Every control is on screen, directly or in the More menu.
      for (const id of ['#btn-mic', '#btn-cam', '#btn-chat', '#btn-more', '#btn-hangup']) assert.ok(await d.isVisible(id), id);
      await screenshot(d, file);
      await d.click('#btn-more');
      for (const id of ['#m-screen', '#m-people', '#m-hand', '#m-flip', '#m-devices', '#m-stats', '#m-rename', '#m-fullscreen']) {
        assert.ok(await d.isVisible(id), `${id} at ${vp.width}×${vp.height}`);
      }
      await screenshot(d, file.replace('.png', '-menu.png'));
      await d.keyboard.press('Escape');
    }
    // Camera flip reaches the camera code (the fake device has one camera: it says so, or switches).
    await d.click('#btn-more');
    await d.click('#m-flip');
    await until(d, () => !document.querySelector('#toast').hidden && /camera/i.test(document.querySelector('#toast').textContent));
    await Promise.all(pages.map((p) => p.context().close()));
  });
});

describe('signaling outage', () => {
  const server = t.server();

  it('peer-to-peer media keeps flowing after the give-up point while the page keeps reconnecting', async () => {
    const room = uniqueRoom('outage');
    // ?giveup=2: the page would end a call without live connections after 2 s without the server.
    const a = await t.open(`${server.url}/r/${room}?name=A&giveup=2`);
    await until(a, () => window.webcall.call.state === 'in-call');
    const b = await t.open(`${server.url}/r/${room}?name=B&giveup=2`);
    const [aId] = await connectedPeers(b, 1);
    await connectedPeers(a, 1);
    await decodesVideoFrom(b, aId);
    // Someone alone in a room has no call to keep: after the give-up point the page says so and lets go of the
    // camera and microphone.
    const alone = await t.open(`${server.url}/r/${uniqueRoom('alone')}?name=Solo&giveup=2`);
    await until(alone, () => window.webcall.call.state === 'in-call');
    await alone.evaluate(() => {
      // @ts-ignore
      window.__tracks = window.webcall.call.localStream.getTracks();
    });
    await server.kill();
    await until(b, () => {
      const el = document.querySelector('#banner');
      return el instanceof HTMLElement && !el.hidden && el.dataset.kind === 'reconnecting' && /continues directly/.test(el.textContent);
    });
    // Past the give-up point (several retries later): still in the call, media still decoded.
    await until(b, () => window.webcall.signaling.attempt >= 5, undefined, 30000);
    assert.notEqual((await snapshot(b)).state, 'failed');
    await decodesVideoFrom(b, aId, 10);
    assert.equal((await snapshot(b)).peers.length, 1);
    await screenshot(b, 'outage.png');

    await until(alone, () => document.querySelector('#overlay')?.dataset.kind === 'unreachable' && !document.querySelector('#overlay').hidden, undefined, 30000);
    assert.match(await alone.textContent('#overlay-title'), /cannot reach the server/i);
    // @ts-ignore
    assert.ok(await alone.evaluate(() => window.__tracks.length > 0 && window.__tracks.every((tr) => tr.readyState === 'ended')));
    assert.notEqual(await alone.textContent('#conn-pill'), 'Connecting…');
    await Promise.all([a, b, alone].map((p) => p.context().close()));
  });
});
