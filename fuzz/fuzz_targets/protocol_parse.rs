//! Any frame: parsing never panics, and what it accepts relays as valid JSON with the payload intact.
#![no_main]

use libfuzzer_sys::fuzz_target;
use webcall_protocol::{parse_client, ClientMessage};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match parse_client(text) {
        Ok(ClientMessage::Relay(r)) => {
            let out = r.encode_from("Abc123-_x");
            let v: serde_json::Value = serde_json::from_str(&out).expect("relayed frames are JSON");
            assert_eq!(v["from"], "Abc123-_x");
            assert_eq!(v["type"], r.kind.as_str());
            let original: serde_json::Value = serde_json::from_str(r.payload.get()).unwrap();
            let field = if r.kind.as_str() == "candidate" { "candidate" } else { "sdp" };
            assert_eq!(v[field], original);
        }
        Ok(ClientMessage::Join(j)) => assert!(webcall_protocol::valid_room_name(&j.room)),
        Ok(ClientMessage::Bye) => {}
        Ok(ClientMessage::Data(d)) => {
            let out = webcall_protocol::encode_data("Abc123-_x", d);
            let v: serde_json::Value = serde_json::from_str(&out).expect("data frames are JSON");
            assert!(v["data"].is_object());
            assert_eq!(v["data"], serde_json::from_str::<serde_json::Value>(d.get()).unwrap());
        }
        Ok(m @ ClientMessage::Record(_)) => {
            let frame = m.to_json();
            let again = parse_client(&frame).expect("a record frame reads back");
            assert_eq!(again.kind(), m.kind());
        }
        Ok(ClientMessage::View(v)) => {
            assert!(v.len() <= webcall_protocol::MAX_VIEW_TRACKS);
            assert!(v.iter().all(|t| t.width <= webcall_protocol::MAX_VIEW_SIZE && !t.mid.is_empty()));
        }
        Err(e) => {
            let v: serde_json::Value = serde_json::from_str(&e.to_json()).expect("error frames are JSON");
            assert_eq!(v["type"], "error");
        }
    }
});
