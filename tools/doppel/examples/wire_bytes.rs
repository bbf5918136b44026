//! Bytes on the wire per dirty page, plain vs XOR+lz4, for the test
//! guest's write patterns on a 64 MiB guest (8 epochs each after the full
//! epoch 0). `cargo run --release -p doppel --example wire_bytes`

use doppel::figures::pattern_wire_bytes;
use doppel_abi::guest::PatternId;

fn main() -> std::io::Result<()> {
    const GUEST: u64 = 64 << 20;
    const EPOCHS: u64 = 8;
    const SEED: u64 = 1;
    println!("guest 64 MiB, {EPOCHS} epochs per pattern, seed {SEED}");
    println!(
        "{:<8} {:>11} {:>15} {:>15} {:>9}",
        "pattern", "dirty pages", "plain B/page", "xlz4 B/page", "ratio"
    );
    for p in PatternId::ALL {
        let f = pattern_wire_bytes(p, SEED, EPOCHS, GUEST)?;
        println!(
            "{:<8} {:>11} {:>15.1} {:>15.1} {:>9.1}",
            format!("{p:?}").to_lowercase(),
            f.dirty_pages,
            f.plain_per_page(),
            f.xlz4_per_page(),
            f.plain as f64 / f.xlz4.max(1) as f64
        );
    }
    Ok(())
}
