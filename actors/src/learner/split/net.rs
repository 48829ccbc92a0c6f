//! The pieces a split network is cut into: a [`Stack`] of dense layers that runs forward on a
//! block of rows and backward from the gradient of its output, so a data party can run its
//! bottom on its own features and a label party its top on the concatenated activations.
//!
//! Plain `f32` loops in a fixed order: the same inputs give the same bits, which is why the split
//! model and the central baseline of one run can be compared to the last digit.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::super::mlp::{axpy, dot};
use super::super::{LearnerError, NamedTensor};

/// Largest parameter count a stack may have (4 GiB of `f32`), checked before allocating.
const MAX_PARAMS: usize = 1 << 30;

/// One fully connected layer: `y = W x + b`, `W` row-major `[outputs, inputs]` (PyTorch's layout).
#[derive(Clone, Debug, PartialEq)]
struct Dense {
    inputs: usize,
    outputs: usize,
    weight: Vec<f32>,
    bias: Vec<f32>,
}

/// Dense layers with ReLU after each, and after the last one too when `relu_last` (a bottom's
/// cut layer is a ReLU layer; a top's last layer gives the logits).
#[derive(Clone, Debug, PartialEq)]
pub struct Stack {
    layers: Vec<Dense>,
    relu_last: bool,
}

/// What a forward pass keeps for the backward pass: the input and every layer's output.
#[derive(Clone, Debug)]
pub struct Trace {
    rows: usize,
    /// `outs[0]` is the input, `outs[l + 1]` the output of layer `l` (after its ReLU).
    outs: Vec<Vec<f32>>,
}

impl Trace {
    /// Rows in the pass.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The stack's output, `rows × outputs`, row-major.
    pub fn output(&self) -> &[f32] {
        self.outs.last().map_or(&[], Vec::as_slice)
    }
}

impl Stack {
    /// A seeded stack of layers `widths[0] → widths[1] → …`: He-uniform weights for layers followed
    /// by ReLU, Glorot-uniform for a last linear layer, zero biases (the [`crate::learner::Mlp`]
    /// initialisation), so every party builds the same start from the same seed.
    pub fn new(widths: &[usize], relu_last: bool, seed: u64) -> Result<Self, LearnerError> {
        if widths.len() < 2 || widths.contains(&0) {
            return Err(LearnerError::InvalidConfig(format!(
                "a stack needs two or more positive widths, got {widths:?}"
            )));
        }
        let params = widths.windows(2).try_fold(0usize, |n, w| {
            w[0].checked_mul(w[1])
                .and_then(|x| x.checked_add(w[1]))
                .and_then(|x| x.checked_add(n))
                .filter(|&x| x <= MAX_PARAMS)
        });
        if params.is_none() {
            return Err(LearnerError::InvalidConfig(format!(
                "more than {MAX_PARAMS} parameters ({widths:?})"
            )));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let last = widths.len() - 2;
        let layers = widths
            .windows(2)
            .enumerate()
            .map(|(l, w)| {
                let (inputs, outputs) = (w[0], w[1]);
                let limit = if l < last || relu_last {
                    (6.0 / inputs as f32).sqrt()
                } else {
                    (6.0 / (inputs + outputs) as f32).sqrt()
                };
                Dense {
                    inputs,
                    outputs,
                    weight: (0..inputs * outputs).map(|_| rng.random_range(-limit..limit)).collect(),
                    bias: vec![0.0; outputs],
                }
            })
            .collect();
        Ok(Self { layers, relu_last })
    }

    /// Features per input row.
    pub fn inputs(&self) -> usize {
        self.layers.first().map_or(0, |l| l.inputs)
    }

    /// Values per output row.
    pub fn outputs(&self) -> usize {
        self.layers.last().map_or(0, |l| l.outputs)
    }

    fn relu(&self, l: usize) -> bool {
        l + 1 < self.layers.len() || self.relu_last
    }

    /// Runs `input` (`rows × inputs`, row-major) through the stack. Errors when the input does not
    /// hold whole rows of the stack's width.
    pub fn forward(&self, input: Vec<f32>) -> Result<Trace, LearnerError> {
        let width = self.inputs();
        if width == 0 || !input.len().is_multiple_of(width) {
            return Err(LearnerError::DataMismatch(format!(
                "{} values are not whole rows of {width}",
                input.len()
            )));
        }
        let rows = input.len() / width;
        let mut outs = Vec::with_capacity(self.layers.len() + 1);
        outs.push(input);
        for (l, layer) in self.layers.iter().enumerate() {
            let relu = self.relu(l);
            let x = &outs[l];
            let mut z = vec![0.0f32; rows * layer.outputs];
            for (xi, zi) in x.chunks_exact(layer.inputs).zip(z.chunks_exact_mut(layer.outputs)) {
                for ((zo, w), b) in zi
                    .iter_mut()
                    .zip(layer.weight.chunks_exact(layer.inputs))
                    .zip(&layer.bias)
                {
                    let v = b + dot(xi, w);
                    *zo = if relu { v.max(0.0) } else { v };
                }
            }
            outs.push(z);
        }
        Ok(Trace { rows, outs })
    }

    /// Backpropagates `grad_out` (the loss gradient w.r.t. the stack's output, `rows × outputs`)
    /// through the pass in `trace`, takes one SGD step of size `lr` on every layer, and returns the
    /// gradient w.r.t. the input (computed with the weights from before the step).
    pub fn backward(&mut self, trace: &Trace, grad_out: &[f32], lr: f32) -> Result<Vec<f32>, LearnerError> {
        let rows = trace.rows;
        if grad_out.len() != rows * self.outputs() || trace.outs.len() != self.layers.len() + 1 {
            return Err(LearnerError::DataMismatch(format!(
                "gradient of {} values for {rows} rows of {}",
                grad_out.len(),
                self.outputs()
            )));
        }
        let mut delta = grad_out.to_vec();
        for l in (0..self.layers.len()).rev() {
            let relu = self.relu(l);
            let layer = &mut self.layers[l];
            let (x, y) = (&trace.outs[l], &trace.outs[l + 1]);
            if relu {
                for (d, &v) in delta.iter_mut().zip(y) {
                    if v <= 0.0 {
                        *d = 0.0;
                    }
                }
            }
            let mut back = vec![0.0f32; rows * layer.inputs];
            for (bi, di) in back
                .chunks_exact_mut(layer.inputs)
                .zip(delta.chunks_exact(layer.outputs))
            {
                for (w, &d) in layer.weight.chunks_exact(layer.inputs).zip(di) {
                    if d != 0.0 {
                        axpy(bi, d, w);
                    }
                }
            }
            let mut gw = vec![0.0f32; layer.weight.len()];
            let mut gb = vec![0.0f32; layer.outputs];
            for (xi, di) in x.chunks_exact(layer.inputs).zip(delta.chunks_exact(layer.outputs)) {
                for ((g, b), &d) in gw.chunks_exact_mut(layer.inputs).zip(&mut gb).zip(di) {
                    if d != 0.0 {
                        *b += d;
                        axpy(g, d, xi);
                    }
                }
            }
            axpy(&mut layer.weight, -lr, &gw);
            axpy(&mut layer.bias, -lr, &gb);
            delta = back;
        }
        Ok(delta)
    }

    /// The parameters as `{prefix}layers.{i}.weight` / `.bias` tensors, sorted by name.
    pub fn params(&self, prefix: &str) -> Vec<NamedTensor> {
        let mut out: Vec<NamedTensor> = self
            .layers
            .iter()
            .enumerate()
            .flat_map(|(i, l)| {
                [
                    NamedTensor {
                        name: format!("{prefix}layers.{i}.weight"),
                        shape: vec![l.outputs, l.inputs],
                        values: l.weight.clone(),
                    },
                    NamedTensor {
                        name: format!("{prefix}layers.{i}.bias"),
                        shape: vec![l.outputs],
                        values: l.bias.clone(),
                    },
                ]
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Layer `i`'s weight (`[outputs, inputs]`) and bias, for tests that compare networks.
    pub fn layer(&self, i: usize) -> Option<(&[f32], &[f32])> {
        self.layers.get(i).map(|l| (l.weight.as_slice(), l.bias.as_slice()))
    }
}

/// Softmax cross-entropy of `logits` (`rows × classes`): the summed loss, the rows whose
/// arg-max is the label and the gradient of the *mean* loss w.r.t. the logits.
pub fn softmax_xent(logits: &[f32], labels: &[u8], classes: usize) -> (f64, usize, Vec<f32>) {
    let rows = labels.len();
    let scale = 1.0 / rows.max(1) as f32;
    let mut grad = vec![0.0f32; logits.len()];
    let (mut loss, mut correct) = (0.0f64, 0);
    for ((z, g), &y) in logits
        .chunks_exact(classes)
        .zip(grad.chunks_exact_mut(classes))
        .zip(labels)
    {
        let y = usize::from(y);
        let (mut best, mut max) = (0, f32::NEG_INFINITY);
        for (c, &v) in z.iter().enumerate() {
            if v > max {
                (best, max) = (c, v);
            }
        }
        let log_sum = z.iter().map(|&v| (v - max).exp()).sum::<f32>().ln();
        loss += f64::from(log_sum - (z[y] - max));
        correct += usize::from(best == y);
        for (gc, &v) in g.iter_mut().zip(z) {
            *gc = (v - max - log_sum).exp() * scale;
        }
        g[y] -= scale;
    }
    (loss, correct, grad)
}
