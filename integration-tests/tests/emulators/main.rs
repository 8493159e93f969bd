//! End-to-end tests against the real emulators, one test binary (built once) with a module per
//! area. They need the emulators that `make test` starts; without the `emulator-tests` feature
//! they are not compiled.
#![cfg(feature = "emulator-tests")]

mod chaos;
mod common;
mod consumption;
mod governance;
mod hostile;
mod pipeline;
mod replay;
