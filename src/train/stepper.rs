//! Who takes a run's optimiser steps: the CPU engine's trainer (f32) or the CUDA engine's
//! (mixed precision with loss scaling, on a GPU or the emulator); a run can switch between
//! them at a resume.

use crate::backend::{engine_on, Backend};
use crate::cpu::Trainer;
use crate::cuda::train::{CudaTrainer, StepReport, INITIAL_LOSS_SCALE};
use crate::engine::{Batch, InferenceEngine};
use crate::model::Model;
use anyhow::Result;
use std::borrow::Cow;

pub enum Stepper {
    Cpu(Box<Trainer>),
    Cuda(Box<CudaTrainer>),
}

impl Stepper {
    /// `trainer` on `backend`; the CUDA engine starts at `loss_scale` (GradScaler's 2^16 when
    /// None).
    pub fn new(trainer: Trainer, backend: Backend, loss_scale: Option<f32>) -> Result<Stepper> {
        Ok(match backend.cuda_device() {
            None => Stepper::Cpu(Box::new(trainer)),
            Some(kind) => Stepper::Cuda(Box::new(CudaTrainer::new(
                &trainer,
                kind,
                loss_scale.unwrap_or(INITIAL_LOSS_SCALE),
            )?)),
        })
    }

    /// One optimiser step on `batch` at learning rate `lr`.
    pub fn step(&mut self, batch: &Batch, lr: f32) -> Result<StepReport> {
        match self {
            Stepper::Cpu(t) => {
                t.config.lr = lr;
                Ok(StepReport {
                    losses: t.step(batch)?,
                    loss_scale: 1.0,
                    skipped: false,
                })
            }
            Stepper::Cuda(t) => {
                t.config.lr = lr;
                t.step(batch)
            }
        }
    }

    /// The model, settings and AdamW state (downloaded from the device for the CUDA engine).
    pub fn trainer(&self) -> Result<Cow<'_, Trainer>> {
        Ok(match self {
            Stepper::Cpu(t) => Cow::Borrowed(t),
            Stepper::Cuda(t) => Cow::Owned(t.to_trainer()?),
        })
    }

    /// The loss scale to store in a checkpoint (None on the CPU engine, which does not scale).
    pub fn loss_scale(&self) -> Result<Option<f32>> {
        Ok(match self {
            Stepper::Cpu(_) => None,
            Stepper::Cuda(t) => Some(t.loss_scale()?.0),
        })
    }

    /// An inference engine on the steps' device for `model` (validation runs where training
    /// does: the f32 CPU engine, or the CUDA engine's fp16 kernels).
    pub fn inference_engine(&self, model: Model) -> Result<Box<dyn InferenceEngine>> {
        let kind = match self {
            Stepper::Cpu(_) => None,
            Stepper::Cuda(t) => Some(t.device_kind()),
        };
        engine_on(model, kind)
    }

    /// Where the steps run.
    pub fn describe(&self) -> String {
        match self {
            Stepper::Cpu(_) => "cpu (f32)".to_string(),
            Stepper::Cuda(t) => format!("{} (fp16 mixed precision)", t.describe()),
        }
    }
}
