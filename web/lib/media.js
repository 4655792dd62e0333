// @ts-check
/** Local media: the microphone and camera, asked for with graceful degradation. No DOM. */

/**
 * Local media, with graceful degradation: asks for what was wanted, then for less.
 * @param {{audio: boolean, video: boolean, audioDevice?: string|null, videoDevice?: string|null}} want
 * @returns {Promise<{audio: MediaStreamTrack|null, video: MediaStreamTrack|null, problems: {kind: 'audio'|'video', error: string}[]}>}
 */
export async function getLocalMedia(want) {
  /** @type {{kind: 'audio'|'video', error: string}[]} */
  const problems = [];
  if (!navigator.mediaDevices?.getUserMedia) {
    if (want.audio) problems.push({ kind: 'audio', error: 'unsupported' });
    if (want.video) problems.push({ kind: 'video', error: 'unsupported' });
    return { audio: null, video: null, problems };
  }
  const audioC = want.audioDevice ? { deviceId: { exact: want.audioDevice } } : true;
  const videoC = {
    width: { ideal: 1280 },
    height: { ideal: 720 },
    frameRate: { ideal: 30 },
    ...(want.videoDevice ? { deviceId: { exact: want.videoDevice } } : {}),
  };
  /** @param {boolean} a @param {boolean} v */
  const ask = (a, v) => navigator.mediaDevices.getUserMedia({ audio: a ? audioC : false, video: v ? videoC : false });
  /** @type {MediaStreamTrack|null} */
  let audio = null;
  /** @type {MediaStreamTrack|null} */
  let video = null;
  if (want.audio && want.video) {
    try {
      const s = await ask(true, true);
      return { audio: s.getAudioTracks()[0] ?? null, video: s.getVideoTracks()[0] ?? null, problems };
    } catch {
      // Fall through: ask for each alone, to learn which one is the problem.
    }
  }
  if (want.audio) {
    try {
      audio = (await ask(true, false)).getAudioTracks()[0] ?? null;
    } catch (e) {
      problems.push({ kind: 'audio', error: mediaErrorName(e) });
    }
  }
  if (want.video) {
    try {
      video = (await ask(false, true)).getVideoTracks()[0] ?? null;
    } catch (e) {
      problems.push({ kind: 'video', error: mediaErrorName(e) });
    }
  }
  return { audio, video, problems };
}

/** @param {any} e @returns {string} `denied`, `missing`, `busy` or the error name */
function mediaErrorName(e) {
  switch (e?.name) {
    case 'NotAllowedError':
    case 'SecurityError':
      return 'denied';
    case 'NotFoundError':
    case 'OverconstrainedError':
      return 'missing';
    case 'NotReadableError':
    case 'AbortError':
      return 'busy';
    default:
      return e?.name ?? 'error';
  }
}
