// @ts-check
/**
 * Tile layout for any number of tiles (mesh or SFU): the grid size that makes tiles largest, how many tiles fit on
 * a page before paging, and the order in which tiles get the visible places (pinned, presenting, recent speakers).
 * No DOM here: the page applies the numbers.
 */

/**
 * The column count that gives the largest tiles for `n` tiles in a `width`×`height` stage.
 * Wide screens keep the video's 16:9 (tiles are centred, letterboxed by the stage); small screens (phones) fill
 * their cells (video is cropped to the cell) with the cell shape nearest to square, which uses the whole screen in
 * both orientations.
 * @param {number} n @param {number} width @param {number} height @param {number} [gap]
 * @returns {{cols: number, rows: number, w: number, h: number}}
 */
export function bestGrid(n, width, height, gap = 12) {
  n = Math.max(1, n);
  const fill = Math.min(width, height) < 500;
  let best = { cols: 1, rows: n, w: 0, h: 0, score: -Infinity };
  for (let cols = 1; cols <= n; cols++) {
    const rows = Math.ceil(n / cols);
    const cw = (width - gap * (cols - 1)) / cols;
    const ch = (height - gap * (rows - 1)) / rows;
    if (cw <= 0 || ch <= 0) continue;
    let w = cw;
    let h = ch;
    let score;
    if (fill) {
      // Nearest to square (in log scale), then largest.
      score = -Math.abs(Math.log(cw / ch)) * 1e9 + cw * ch;
    } else {
      h = w / (16 / 9);
      if (h > ch) {
        h = ch;
        w = h * (16 / 9);
      }
      score = w * h;
    }
    if (score > best.score) best = { cols, rows, w, h, score };
  }
  return { cols: best.cols, rows: best.rows, w: Math.floor(best.w), h: Math.floor(best.h) };
}

/**
 * How many tiles fit on one page with tiles at least `minWidth` wide (phones: 2×3 at most).
 * @param {number} width @param {number} height @param {number} [minWidth]
 */
export function tilesPerPage(width, height, minWidth = 220) {
  if (Math.min(width, height) < 500) return 6;
  let n = 1;
  while (n < 49 && bestGrid(n + 1, width, height).w >= minWidth) n++;
  return n;
}

/**
 * The order of tiles for paging: pinned first, then people presenting, then by the last time they spoke (most
 * recent first), then in the order they came. The local tile stays on the first page.
 * @param {{id: string, pinned: boolean, presenting: boolean, lastSpoke: number, local: boolean, since: number}[]} tiles
 */
export function tileOrder(tiles) {
  return [...tiles].sort(
    (a, b) =>
      Number(b.pinned) - Number(a.pinned) ||
      Number(b.presenting) - Number(a.presenting) ||
      Number(b.local) - Number(a.local) ||
      b.lastSpoke - a.lastSpoke ||
      a.since - b.since,
  );
}
