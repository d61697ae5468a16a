//! The fault suite's short form: every fault once, then nothing lost, nothing twice,
//! nothing out of order, and only the planted bad records quarantined.

use anyhow::Result;

#[tokio::test(flavor = "multi_thread")]
async fn fault_suite_short_form() -> Result<()> {
    let outcome = hmr_e2e::faults::run(hmr_e2e::faults::Intensity::short()).await?;
    println!("{}", outcome.table());
    assert!(outcome.lost.is_empty(), "lost: {:#?}", outcome.lost);
    assert!(
        outcome.second_effects.is_empty(),
        "second effects: {:#?}",
        outcome.second_effects
    );
    assert!(
        outcome.out_of_order.is_empty(),
        "out of order: {:#?}",
        outcome.out_of_order
    );
    assert!(
        outcome.unexpected_quarantine.is_empty(),
        "quarantined: {:#?}",
        outcome.unexpected_quarantine
    );
    assert!(outcome.approvals > 50, "a real stream ran: {}", outcome.approvals);
    assert!(outcome.decisions > 0, "decisions were made during the faults");
    Ok(())
}
