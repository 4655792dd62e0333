// @ts-check
/**
 * Tells the SFU how large each remote video is shown (docs/protocol.md, *Simulcast*), so that it forwards the layer
 * the tile needs and nothing for tiles that are not seen: off the page (paging), hidden, or the whole tab in the
 * background. Sizes are in device pixels; a change is sent at most every 300 ms.
 */

/** @param {import('../lib/call.js').Call} call */
export function watchViews(call) {
  /** @type {Map<HTMLVideoElement, boolean>} observed <video> elements of tiles -> on screen */
  const seen = new Map();
  /** @type {Map<MediaStreamTrack, {width: number, height: number}>} the last report */
  let last = new Map();
  let timer = 0;
  const report = () => {
    if (timer) return;
    timer = window.setTimeout(() => {
      timer = 0;
      const sfu = call.sfu;
      if (!sfu) return;
      /** @type {Map<MediaStreamTrack, {width: number, height: number}>} */
      const views = new Map();
      // A track once shown and now gone from the page (its tile removed) is not shown.
      for (const track of last.keys()) views.set(track, { width: 0, height: 0 });
      const dpr = window.devicePixelRatio || 1;
      for (const [video, onScreen] of seen) {
        if (!video.isConnected) {
          seen.delete(video);
          continue;
        }
        const stream = video.srcObject;
        const track = stream instanceof MediaStream ? stream.getVideoTracks()[0] : undefined;
        if (!track) continue;
        const r = video.getBoundingClientRect();
        const shown = onScreen && !document.hidden && r.width > 0 && r.height > 0;
        const v = shown ? { width: r.width * dpr, height: r.height * dpr } : { width: 0, height: 0 };
        const had = views.get(track);
        // The same track in two places (pinned and in the grid): the larger one counts.
        if (!had || v.width * v.height > had.width * had.height) views.set(track, v);
      }
      last = views;
      sfu.reportViews(views);
    }, 300);
  };
  const resize = new ResizeObserver(report);
  const visible = new IntersectionObserver((entries) => {
    for (const e of entries) seen.set(/** @type {HTMLVideoElement} */ (e.target), e.isIntersecting);
    report();
  });
  const scan = () => {
    for (const v of document.querySelectorAll('.tile:not(.local) video')) {
      if (!(v instanceof HTMLVideoElement) || seen.has(v)) continue;
      seen.set(v, true);
      resize.observe(v);
      visible.observe(v);
    }
    report();
  };
  new MutationObserver(scan).observe(document.body, { childList: true, subtree: true, attributes: true, attributeFilter: ['class'] });
  document.addEventListener('visibilitychange', report);
  // New tracks arrive on existing elements (srcObject changes are not mutations); the SFU renegotiates.
  window.setInterval(report, 2000);
  scan();
}
