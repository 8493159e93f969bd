//! Any text as a configuration: parsed or refused with a message, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Err(message) = logflow::config::Config::parse(text)
    {
        assert!(!message.is_empty(), "a refusal says why");
    }
});
