//! Slow training on purpose, for demonstrations and fault tests.

/// A learner whose training takes at least `delay`: stands in for slow local training in
/// demonstrations and fault tests (a crash then lands mid-round, not between rounds).
pub struct Paced<L> {
    inner: L,
    delay: std::time::Duration,
    /// The inner learner's [`crate::learner::TensorStream::piece_bytes`], asked once.
    piece: Option<usize>,
}

impl<L: crate::learner::Learner> Paced<L> {
    /// Wraps `inner`; each training step sleeps `delay` before it returns.
    pub fn new(mut inner: L, delay: std::time::Duration) -> Self {
        let piece = inner.streaming().and_then(|s| s.piece_bytes());
        Self { inner, delay, piece }
    }
}

impl<L: crate::learner::Learner> crate::learner::Learner for Paced<L> {
    fn train(
        &mut self,
        global: flare_protocols::model::Model,
        ctx: &crate::learner::TaskContext,
    ) -> Result<crate::learner::TrainOutput, String> {
        let out = self.inner.train(global, ctx);
        std::thread::sleep(self.delay);
        out
    }

    fn validate(
        &mut self,
        model: &flare_protocols::model::Model,
        ctx: &crate::learner::TaskContext,
    ) -> Result<std::collections::BTreeMap<String, f64>, String> {
        self.inner.validate(model, ctx)
    }

    fn run_task(
        &mut self,
        input: Option<flare_protocols::model::Model>,
        ctx: &crate::learner::TaskContext,
    ) -> Result<crate::learner::TaskReply, String> {
        self.inner.run_task(input, ctx)
    }

    fn local_model(&self) -> Option<flare_protocols::model::Model> {
        self.inner.local_model()
    }

    fn streaming(&mut self) -> Option<&mut dyn crate::learner::TensorStream> {
        match self.inner.streaming() {
            Some(_) => Some(self),
            None => None,
        }
    }
}

/// The inner learner's pass, then the delay.
impl<L: crate::learner::Learner> crate::learner::TensorStream for Paced<L> {
    fn tensor(
        &mut self,
        name: &str,
        dtype: flare_protocols::model::DType,
        data: &mut [u8],
        ctx: &crate::learner::TaskContext,
    ) -> Result<(), String> {
        match self.inner.streaming() {
            Some(s) => s.tensor(name, dtype, data, ctx),
            None => Err("this learner does not stream".into()),
        }
    }

    fn finish(
        &mut self,
        ctx: &crate::learner::TaskContext,
    ) -> Result<(u64, std::collections::BTreeMap<String, f64>), String> {
        let out = match self.inner.streaming() {
            Some(s) => s.finish(ctx),
            None => Err("this learner does not stream".into()),
        };
        std::thread::sleep(self.delay);
        out
    }

    fn piece_bytes(&self) -> Option<usize> {
        self.piece
    }

    fn samples_ahead(&mut self) -> Option<u64> {
        self.inner.streaming().and_then(|s| s.samples_ahead())
    }
}
