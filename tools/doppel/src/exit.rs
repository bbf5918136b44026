//! The exit codes of the `doppel` command, in one place (README, "Exit
//! codes"), and the result its subcommands return.

/// A subcommand's result: an error line and the exit code it ends with.
pub type Res = Result<(), (String, u8)>;

/// The input (a stream, a machine, the peer's records) was invalid.
pub const INVALID: u8 = 1;
/// Bad flags or configuration.
pub const USAGE: u8 = 2;
/// A file or socket failed.
pub const IO: u8 = 3;
/// The peer went away (before anything could be done with it).
pub const PEER_GONE: u8 = 4;
/// `doppel primary`: the backup connection failed, or it served on
/// without its backup.
pub const LOST_BACKUP: u8 = 5;
/// A side that was fenced, or refused by the witness.
pub const FENCED: u8 = 6;
