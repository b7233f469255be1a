//! A job whose cancel was requested while it ran never runs again: retried, handed back or
//! rescued, it ends `cancelled`.
use crate::helpers::*;
use shrink::store::now_ms;

/// Queues an evaluate job, claims it as worker `w`, and asks through the API to cancel it.
async fn running_job_with_cancel_requested(app: &TestApp) -> String {
    let id = app.queue_evaluate_job().await;
    let now = now_ms();
    let claimed = app.db.claim_next_job("w", now, now + 60_000).await.unwrap();
    assert_eq!(claimed.map(|j| j.id), Some(id.clone()));
    let r = app
        .client
        .post(app.url(&format!("/jobs/{id}/cancel")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    id
}

/// How the worker records an infrastructure failure.
const DISK_FULL: &str = r#"{"type": "infrastructure", "message": "disk full", "causes": []}"#;

async fn status(app: &TestApp, id: &str) -> String {
    let (_, j) = app.get_json(&format!("/jobs/{id}")).await;
    j["status"]
        .as_str()
        .unwrap_or_else(|| panic!("{j}"))
        .to_string()
}

async fn ends_cancelled_however_its_attempt_ends(setup: Setup) {
    let app = spawn_app(setup).await;

    let handed_back = running_job_with_cancel_requested(&app).await;
    assert!(app.db.hand_back(&handed_back, "w", now_ms()).await.unwrap());
    assert_eq!(status(&app, &handed_back).await, "cancelled", "handed back");

    let retried = running_job_with_cancel_requested(&app).await;
    let outcome = app
        .db
        .fail_attempt(&retried, "w", now_ms(), DISK_FULL, true)
        .await
        .unwrap();
    assert_eq!(outcome, shrink::store::queue::FailOutcome::Cancelled);
    assert_eq!(status(&app, &retried).await, "cancelled", "retried");

    let rescued = running_job_with_cancel_requested(&app).await;
    // The worker died: its lease ran out an hour from now.
    let later = now_ms() + 3_600_000;
    assert_eq!(app.db.rescue_expired(later).await.unwrap(), 1);
    assert_eq!(status(&app, &rescued).await, "cancelled", "rescued");

    let now = now_ms();
    assert!(
        app.db
            .claim_next_job("w2", later, now + 60_000)
            .await
            .unwrap()
            .is_none(),
        "no cancelled job is claimed again"
    );
    app.drain().await;
    for id in [&handed_back, &retried, &rescued] {
        assert_eq!(status(&app, id).await, "cancelled");
    }
}

#[tokio::test]
async fn a_job_cancelled_while_running_ends_cancelled_on_sqlite() {
    ends_cancelled_however_its_attempt_ends(Setup::Embedded).await;
}

#[tokio::test]
async fn a_job_cancelled_while_running_ends_cancelled_on_postgres() {
    ends_cancelled_however_its_attempt_ends(Setup::Production).await;
}
