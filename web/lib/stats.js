// @ts-check
/**
 * One-line summaries of `RTCPeerConnection.getStats()` for the stats panel (and the tests).
 */

/**
 * @typedef {object} StatsSummary
 * @property {number} timestamp          ms
 * @property {string|null} pairType      candidate type of the selected pair's local side: host, srflx, prflx, relay
 * @property {string|null} remotePairType candidate type of the selected pair's remote side
 * @property {string|null} protocol      udp / tcp of the selected local candidate
 * @property {string|null} localAddress  "ip:port" of the selected local candidate
 * @property {string|null} remoteAddress "ip:port" of the selected remote candidate
 * @property {number|null} rtt           seconds (currentRoundTripTime of the selected pair)
 * @property {number} bytesIn
 * @property {number} bytesOut
 * @property {number|null} bitrateIn     bits per second since the previous summary
 * @property {number|null} bitrateOut
 * @property {{width:number, height:number, fps:number|null, framesDecoded:number}|null} videoIn
 * @property {{width:number, height:number, fps:number|null}|null} videoOut
 * @property {number|null} audioLevelIn  0..1
 * @property {number} packetsLost        sum over inbound RTP streams
 */

/**
 * @param {RTCPeerConnection} pc
 * @param {StatsSummary|null} prev the previous summary of this connection, for bit rates
 * @returns {Promise<StatsSummary>}
 */
export async function summarize(pc, prev) {
  const report = await pc.getStats();
  /** @type {any} */
  let pair = null;
  /** @type {any[]} */
  const all = [];
  report.forEach((s) => all.push(s));
  const transport = all.find((s) => s.type === 'transport' && s.selectedCandidatePairId);
  if (transport) pair = report.get(transport.selectedCandidatePairId) ?? null;
  if (!pair) pair = all.find((s) => s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') ?? null;
  const local = pair ? report.get(pair.localCandidateId) : null;
  const remote = pair ? report.get(pair.remoteCandidateId) : null;

  let bytesIn = 0;
  let bytesOut = 0;
  let packetsLost = 0;
  /** @type {StatsSummary['videoIn']} */
  let videoIn = null;
  /** @type {StatsSummary['videoOut']} */
  let videoOut = null;
  /** @type {number|null} */
  let audioLevelIn = null;
  for (const s of all) {
    if (s.type === 'inbound-rtp') {
      bytesIn += s.bytesReceived ?? 0;
      packetsLost += Math.max(0, s.packetsLost ?? 0);
      if (s.kind === 'video' && (s.framesDecoded ?? 0) >= (videoIn?.framesDecoded ?? -1)) {
        videoIn = {
          width: s.frameWidth ?? 0,
          height: s.frameHeight ?? 0,
          fps: s.framesPerSecond ?? null,
          framesDecoded: s.framesDecoded ?? 0,
        };
      }
      if (s.kind === 'audio' && typeof s.audioLevel === 'number') audioLevelIn = s.audioLevel;
    } else if (s.type === 'outbound-rtp') {
      bytesOut += s.bytesSent ?? 0;
      if (s.kind === 'video' && s.frameWidth) {
        videoOut = { width: s.frameWidth, height: s.frameHeight ?? 0, fps: s.framesPerSecond ?? null };
      }
    }
  }
  const timestamp = performance.now();
  const dt = prev ? (timestamp - prev.timestamp) / 1000 : 0;
  const rate = (/** @type {number} */ now, /** @type {number} */ before) =>
    dt > 0 && now >= before ? ((now - before) * 8) / dt : null;
  return {
    timestamp,
    pairType: local?.candidateType ?? null,
    remotePairType: remote?.candidateType ?? null,
    protocol: local?.protocol ?? null,
    localAddress: local ? `${local.address ?? local.ip}:${local.port}` : null,
    remoteAddress: remote ? `${remote.address ?? remote.ip}:${remote.port}` : null,
    rtt: pair?.currentRoundTripTime ?? null,
    bytesIn,
    bytesOut,
    bitrateIn: prev ? rate(bytesIn, prev.bytesIn) : null,
    bitrateOut: prev ? rate(bytesOut, prev.bytesOut) : null,
    videoIn,
    videoOut,
    audioLevelIn,
    packetsLost,
  };
}

/** @param {number|null} bps */
export function formatBitrate(bps) {
  if (bps === null) return '–';
  if (bps >= 1e6) return `${(bps / 1e6).toFixed(2)} Mb/s`;
  return `${Math.round(bps / 1e3)} kb/s`;
}
