//! The gradient adapter: a module's trainable parameters and their gradients as one
//! flat `f32` buffer with a stable order and PyTorch-style dotted names, and writing
//! new parameter values back. This is the seam between the engine and everything that
//! moves or updates numbers (optimizers, allreduce, parameter servers, checkpoints).

use crate::{Error, Result};
use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};

/// One parameter's place in the flat buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    /// Dotted path, e.g. `encoder.0.weight_ih`.
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
}

/// The order, names and shapes of a module's float parameters, as visited by the engine
/// (struct field order, vector index order), and their offsets in a flat buffer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FlatLayout {
    pub params: Vec<ParamSpec>,
    pub total: usize,
}

struct Path(Vec<String>);

impl Path {
    fn name(&self) -> String {
        self.0.join(".")
    }
}

struct LayoutVisitor {
    path: Path,
    layout: FlatLayout,
}

impl<B: Backend> ModuleVisitor<B> for LayoutVisitor {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.0.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.0.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let shape = param.val().dims().to_vec();
        let len = shape.iter().product();
        self.layout.params.push(ParamSpec {
            name: self.path.name(),
            shape,
            offset: self.layout.total,
            len,
        });
        self.layout.total += len;
    }
}

fn copy_into(data: TensorData, out: &mut [f32], name: &str) -> Result<()> {
    let data = if data.dtype == burn::tensor::DType::F32 {
        data
    } else {
        data.convert::<f32>()
    };
    let vals = data
        .as_slice::<f32>()
        .map_err(|e| Error::Engine(format!("reading '{name}': {e:?}")))?;
    if vals.len() != out.len() {
        return Err(Error::Layout(format!(
            "'{name}' has {} values, layout says {}",
            vals.len(),
            out.len()
        )));
    }
    out.copy_from_slice(vals);
    Ok(())
}

struct ReadVisitor<'a> {
    layout: &'a FlatLayout,
    index: usize,
    out: &'a mut [f32],
    error: Option<Error>,
}

impl<B: Backend> ModuleVisitor<B> for ReadVisitor<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.error.is_some() {
            return;
        }
        let Some(spec) = self.layout.params.get(self.index) else {
            self.error = Some(Error::Layout(
                "module has more parameters than the layout".into(),
            ));
            return;
        };
        self.index += 1;
        let dst = &mut self.out[spec.offset..spec.offset + spec.len];
        if let Err(e) = copy_into(param.val().into_data(), dst, &spec.name) {
            self.error = Some(e);
        }
    }
}

/// Where gradients are read from: borrowed (they stay in the container) or taken
/// (moved out, which leaves each tensor unshared so reading it needs no copy).
enum GradSource<'a, B: AutodiffBackend> {
    Read(&'a B::Gradients),
    Take(&'a mut B::Gradients),
}

struct GradVisitor<'a, B: AutodiffBackend> {
    layout: &'a FlatLayout,
    grads: GradSource<'a, B>,
    index: usize,
    out: &'a mut [f32],
    error: Option<Error>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GradVisitor<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.error.is_some() {
            return;
        }
        let Some(spec) = self.layout.params.get(self.index) else {
            self.error = Some(Error::Layout(
                "module has more parameters than the layout".into(),
            ));
            return;
        };
        self.index += 1;
        let dst = &mut self.out[spec.offset..spec.offset + spec.len];
        let grad = match &mut self.grads {
            GradSource::Read(g) => param.val().grad(g),
            GradSource::Take(g) => param.val().grad_remove(g),
        };
        match grad {
            Some(g) => {
                if let Err(e) = copy_into(g.into_data(), dst, &spec.name) {
                    self.error = Some(e);
                }
            }
            // A parameter the loss does not depend on has a zero gradient.
            None => dst.fill(0.0),
        }
    }
}

struct WriteMapper<'a> {
    layout: &'a FlatLayout,
    index: usize,
    src: &'a [f32],
    error: Option<Error>,
}

impl<B: Backend> ModuleMapper<B> for WriteMapper<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        if self.error.is_some() {
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let Some(spec) = self.layout.params.get(self.index) else {
            self.error = Some(Error::Layout(
                "module has more parameters than the layout".into(),
            ));
            return Param::from_mapped_value(id, tensor, mapper);
        };
        self.index += 1;
        if tensor.dims().as_slice() != spec.shape.as_slice() {
            self.error = Some(Error::Layout(format!(
                "'{}' has shape {:?}, layout says {:?}",
                spec.name,
                tensor.dims(),
                spec.shape
            )));
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let values = self.src[spec.offset..spec.offset + spec.len].to_vec();
        let device = tensor.device();
        let mut new = Tensor::<B, D>::from_data(TensorData::new(values, tensor.shape()), &device);
        if tensor.is_require_grad() {
            new = new.require_grad();
        }
        Param::from_mapped_value(id, new, mapper)
    }
}

impl FlatLayout {
    /// The layout of `module`'s float parameters.
    pub fn of<B: Backend, M: Module<B>>(module: &M) -> Self {
        let mut v = LayoutVisitor {
            path: Path(Vec::new()),
            layout: FlatLayout::default(),
        };
        module.visit(&mut v);
        v.layout
    }

    /// Index of the parameter called `name`.
    pub fn find(&self, name: &str) -> Option<&ParamSpec> {
        self.params.iter().find(|p| p.name == name)
    }

    fn check_len(&self, what: &str, len: usize) -> Result<()> {
        if len != self.total {
            return Err(Error::Layout(format!(
                "{what} buffer has {len} values, the model has {}",
                self.total
            )));
        }
        Ok(())
    }

    fn finish(&self, index: usize, error: Option<Error>) -> Result<()> {
        if let Some(e) = error {
            return Err(e);
        }
        if index != self.params.len() {
            return Err(Error::Layout(format!(
                "module has {index} parameters, the layout {}",
                self.params.len()
            )));
        }
        Ok(())
    }

    /// Copies every parameter of `module` into `out` (`out.len() == total`).
    pub fn read_params<B: Backend, M: Module<B>>(&self, module: &M, out: &mut [f32]) -> Result<()> {
        self.check_len("parameter", out.len())?;
        let mut v = ReadVisitor {
            layout: self,
            index: 0,
            out,
            error: None,
        };
        module.visit(&mut v);
        self.finish(v.index, v.error)
    }

    /// Copies every parameter's gradient from `grads` (the result of `loss.backward()`)
    /// into `out`; parameters without a gradient get zeros.
    pub fn read_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
        module: &M,
        grads: &B::Gradients,
        out: &mut [f32],
    ) -> Result<()> {
        self.visit_grads(module, GradSource::Read(grads), out)
    }

    fn visit_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
        module: &M,
        grads: GradSource<'_, B>,
        out: &mut [f32],
    ) -> Result<()> {
        self.check_len("gradient", out.len())?;
        let mut v = GradVisitor::<B> {
            layout: self,
            grads,
            index: 0,
            out,
            error: None,
        };
        module.visit(&mut v);
        self.finish(v.index, v.error)
    }

    /// Like [`FlatLayout::read_grads`], but moves the gradients out of `grads` (one
    /// copy fewer; they are gone from `grads` afterwards).
    pub fn take_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
        module: &M,
        grads: &mut B::Gradients,
        out: &mut [f32],
    ) -> Result<()> {
        self.visit_grads(module, GradSource::Take(grads), out)
    }

    /// Returns `module` with every parameter replaced by its values in `src`
    /// (parameter ids and gradient tracking are kept).
    pub fn write_params<B: Backend, M: Module<B>>(&self, module: M, src: &[f32]) -> Result<M> {
        self.check_len("parameter", src.len())?;
        let mut m = WriteMapper {
            layout: self,
            index: 0,
            src,
            error: None,
        };
        let module = module.map(&mut m);
        self.finish(m.index, m.error)?;
        Ok(module)
    }
}
