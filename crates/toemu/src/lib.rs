//! toemu: wires emulated TOE hosts together (NIC + bus + driver), on one thread with a
//! virtual clock or threaded in real time, and hosts the `toemu` command line.

pub mod config;
