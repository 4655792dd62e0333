// The invite button copies the call's link, and that link brings a second person into the same call.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { connectedPeers, e2e, uniqueRoom, until } from './helpers.mjs';

const t = e2e();

describe('invite link', () => {
  const server = t.server();

  it('copies the room link, which joins the same call', async () => {
    const room = uniqueRoom('invite');
    const host = await t.open(`${server.url}/r/${room}?name=Host`);
    await host.context().grantPermissions(['clipboard-read', 'clipboard-write'], { origin: server.url });
    await until(host, () => window.webcall?.call.state === 'in-call');
    await host.click('#btn-invite');
    const copied = await host.evaluate(() => navigator.clipboard.readText());
    assert.equal(copied, `${server.url}/r/${room}`);
    const toast = host.locator('#toast');
    await toast.waitFor({ state: 'visible', timeout: 5000 });
    assert.match(await toast.textContent(), /copied/i);

    const guest = await t.open(`${copied}?name=Guest`);
    const [hostId] = await connectedPeers(guest, 1);
    const [guestId] = await connectedPeers(host, 1);
    assert.ok(hostId && guestId && hostId !== guestId);
  });
});
