//! `cargo run -p hmr-e2e --bin hmr-fault-suite [-- --long]`: the fault suite's report.

fn main() -> anyhow::Result<()> {
    let long = std::env::args().any(|a| a == "--long");
    let plan = if long {
        hmr_e2e::faults::Intensity::long()
    } else {
        hmr_e2e::faults::Intensity::short()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let outcome = runtime.block_on(hmr_e2e::faults::run(plan.clone()))?;
    println!(
        "fault suite ({}): {plan:?}\n\n{}",
        if long { "long" } else { "short" },
        outcome.table()
    );
    for list in [
        &outcome.lost,
        &outcome.second_effects,
        &outcome.out_of_order,
        &outcome.unexpected_quarantine,
    ] {
        for line in list.iter().take(20) {
            println!("  {line}");
        }
    }
    anyhow::ensure!(outcome.passed(), "the fault suite found problems");
    Ok(())
}
