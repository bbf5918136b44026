//! Hardware data formats of the two virtualization vendors: pure layouts and
//! encodings, no instructions. The kernel's backends use them; the host tests
//! check them.

pub mod vmcb;
pub mod vmcs;
