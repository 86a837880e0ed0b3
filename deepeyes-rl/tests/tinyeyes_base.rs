//! TinyEyes' base stage driven as `deepeyes pretrain-synthetic` drives it: from a fresh
//! checkpoint, a few dozen steps lower the supervised loss, the held-out evaluation reports
//! proportions, and the saved checkpoint loads back into the engine with its tokenizer and
//! prompt templates.

use deepeyes_rl::network::{ComputeDevice, Qwen25Vl};
use deepeyes_rl::tinyeyes::{BaseStage, BaseStageConfig, TinyEyesFormat, init_checkpoint};

#[test]
fn base_stage_lowers_its_loss_and_saves_a_loadable_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init");
    init_checkpoint(&init, 1).unwrap();
    let config = BaseStageConfig {
        steps: 30,
        batch_size: 8,
        lr: 2e-3,
        warmup_steps: 5,
        pool_size: 12,
        eval_items: 6,
        seed: 1,
        // Exercise soft coordinate labels (a Gaussian over neighbouring bins).
        soft_coordinates: 1.0,
        // Both phases: square canvases, then TinyEyes' distribution.
        square_steps: 10,
        ..BaseStageConfig::default()
    };
    let mut stage = BaseStage::new(&init, config.clone()).unwrap();
    let losses: Vec<f64> = (0..30).map(|_| stage.train_step().unwrap().loss).collect();
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&losses[..5]), mean(&losses[25..]));
    assert!(
        last < 0.6 * first,
        "loss {first:.3} → {last:.3}: {losses:?}"
    );
    assert_eq!(stage.step_count(), 30);

    let e = stage.evaluate().unwrap();
    for v in [
        e.ground_iou,
        e.ground_hit,
        e.perception_acc,
        e.zoom_prob,
        e.card_cell_acc,
        e.card_token_acc,
    ] {
        assert!((0.0..=1.0).contains(&v), "{e:?}");
    }

    let saved = stage.save(&init, &dir.path().join("checkpoints")).unwrap();
    assert!(saved.ends_with("step-00000030"));
    let resumed = deepeyes_rl::checkpoint::latest_intact(&dir.path().join("checkpoints"))
        .unwrap()
        .0
        .unwrap();
    assert_eq!(
        BaseStage::resume(&resumed, config).unwrap().step_count(),
        30
    );
    let device = ComputeDevice::Flex.device(false).unwrap();
    let model = Qwen25Vl::from_pretrained(&saved, &device).unwrap();
    assert_eq!(model.config, stage.model().config);
    assert!(saved.join("tokenizer.json").is_file());
    assert_eq!(
        deepeyes_core::PromptTemplates::for_bundle(&saved).unwrap(),
        TinyEyesFormat::default().templates
    );
    assert_eq!(
        deepeyes_core::agent::BundleAgentDefaults::for_bundle(&saved).unwrap(),
        TinyEyesFormat::default().agent
    );
}

/// The committed base (`assets/tinyeyes`, which `deepeyes demo` starts from) has what the paper's
/// base model had, on TinyEyes' distribution (any canvas, up to two decoys): it finds the cards
/// and reads close-ups on held-out canvases, yet seldom chooses to zoom, so GRPO has something to
/// teach. Measured at commit time (run 17): card token 0.969, hit 0.812, IoU 0.195, perception
/// 0.578, p(zoom) 0.237; the bounds leave room only for numeric noise.
#[test]
fn the_committed_base_grounds_and_perceives_but_seldom_zooms() {
    let assets = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/tinyeyes");
    let config = BaseStageConfig {
        pool_size: 1,
        eval_items: 64,
        ..BaseStageConfig::default()
    };
    let mut stage = BaseStage::new(&assets, config).unwrap();
    let e = stage.evaluate().unwrap();
    assert!(e.card_token_acc >= 0.9, "{e:?}");
    assert!(e.ground_hit >= 0.75, "{e:?}");
    assert!(e.ground_iou >= 0.15, "{e:?}");
    assert!(e.perception_acc >= 0.55, "{e:?}");
    assert!((0.1..=0.35).contains(&e.zoom_prob), "{e:?}");
    // It carries the agent-loop limits it is trained under, so `deepeyes run` needs no flags.
    assert_eq!(
        deepeyes_core::agent::BundleAgentDefaults::for_bundle(&assets).unwrap(),
        TinyEyesFormat::default().agent
    );
}
