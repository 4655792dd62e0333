// @ts-check
/**
 * The data channel of each peer-to-peer connection (docs/protocol.md, *Data channel: chat*): negotiated on both sides with
 * a fixed label and id (so no in-band DCEP is needed), JSON text messages `media`, `name`, `hand` and `chat`.
 */

/** Data channel label and id (negotiated on both sides, so no in-band DCEP is needed). */
export const CHAT_CHANNEL = { label: 'chat', id: 0 };
/** The longest chat text sent or shown. */
export const MAX_CHAT_TEXT = 4000;

/**
 * @typedef {object} MediaState what a peer sends, as told over the data channel
 * @property {boolean} audio microphone on (not muted)
 * @property {boolean} video camera on
 * @property {boolean} screen sharing the screen (on a video track of its own, beside the camera)
 * @property {string} [screenStream] the id of the stream (msid) the screen track is sent with
 * @property {string} [screenMid] in an SFU room: the mid of our m-line that carries the screen (SFU `tracks` `peerMid`)
 */

/** A display name as the server takes it: at most 64 characters, no control characters. @param {string} name */
export function cleanName(name) {
  // eslint-disable-next-line no-control-regex
  return name.replace(/[\u0000-\u001f\u007f]/g, '').trim().slice(0, 64);
}

/** @param {RTCPeerConnection} pc */
export function createChatChannel(pc) {
  return pc.createDataChannel(CHAT_CHANNEL.label, { negotiated: true, id: CHAT_CHANNEL.id, ordered: true });
}

/**
 * A data channel message as an object, or null for anything else (not JSON, not an object): the receiver checks
 * each field it uses. @param {string|ArrayBuffer} data @returns {any}
 */
export function readMessage(data) {
  let msg;
  try {
    msg = JSON.parse(typeof data === 'string' ? data : new TextDecoder().decode(data));
  } catch {
    return null;
  }
  return msg && typeof msg === 'object' ? msg : null;
}
