//! A read-only view of a graph for the transformations in later stages: nodes in topological
//! order, who produces and who consumes each value, and weights by name.
use super::proto::{GraphProto, NodeProto, TensorProto};
use crate::engine::{EngineError, Result};
use std::collections::{HashMap, VecDeque};

pub struct GraphView<'g> {
    pub graph: &'g GraphProto,
    /// Node indices in an order where every node comes after the producers of its inputs.
    pub order: Vec<usize>,
    /// Value name -> index of the node that produces it.
    pub producer: HashMap<&'g str, usize>,
    /// Value name -> indices of the nodes that read it.
    pub consumers: HashMap<&'g str, Vec<usize>>,
    /// Weight name -> tensor, from initializers and `Constant` nodes.
    pub weights: HashMap<&'g str, &'g TensorProto>,
}

impl<'g> GraphView<'g> {
    pub fn new(graph: &'g GraphProto) -> Result<Self> {
        let mut producer = HashMap::new();
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut weights: HashMap<&str, &TensorProto> = HashMap::new();
        for t in &graph.initializer {
            weights.insert(t.name.as_deref().unwrap_or(""), t);
        }
        for (i, node) in graph.node.iter().enumerate() {
            for out in &node.output {
                producer.insert(out.as_str(), i);
            }
            for input in node.input.iter().filter(|s| !s.is_empty()) {
                consumers.entry(input.as_str()).or_default().push(i);
            }
            if node.op_type.as_deref() == Some("Constant") {
                if let (Some(out), Some(t)) = (
                    node.output.first(),
                    node.attribute.iter().find_map(|a| a.t.as_ref()),
                ) {
                    weights.insert(out.as_str(), t);
                }
            }
        }
        let order = topological_order(&graph.node, &producer)?;
        Ok(Self {
            graph,
            order,
            producer,
            consumers,
            weights,
        })
    }

    pub fn node(&self, index: usize) -> &'g NodeProto {
        &self.graph.node[index]
    }

    /// Nodes in topological order.
    pub fn nodes(&self) -> impl Iterator<Item = &'g NodeProto> + '_ {
        self.order.iter().map(|&i| &self.graph.node[i])
    }
}

/// Kahn's algorithm; ties keep file order so results are deterministic.
fn topological_order(nodes: &[NodeProto], producer: &HashMap<&str, usize>) -> Result<Vec<usize>> {
    let mut indegree = vec![0usize; nodes.len()];
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for (i, node) in nodes.iter().enumerate() {
        for input in node.input.iter().filter(|s| !s.is_empty()) {
            if let Some(&p) = producer.get(input.as_str()) {
                if p != i {
                    indegree[i] += 1;
                    dependents[p].push(i);
                }
            }
        }
    }
    let mut ready: VecDeque<usize> = (0..nodes.len()).filter(|&i| indegree[i] == 0).collect();
    let mut order = Vec::with_capacity(nodes.len());
    while let Some(i) = ready.pop_front() {
        order.push(i);
        for &d in &dependents[i] {
            indegree[d] -= 1;
            if indegree[d] == 0 {
                ready.push_back(d);
            }
        }
    }
    if order.len() != nodes.len() {
        return Err(EngineError::InvalidModel("the graph has a cycle".into()));
    }
    Ok(order)
}
