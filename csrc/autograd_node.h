// A new autograd node, owned the way the running torch's autograd graph owns them: torch moved Node from
// std::shared_ptr to c10::intrusive_ptr, and the library is built against whichever torch is installed (the GPU
// machines' stack is older than the main one). Edge::function has the type in use.
#pragma once

#include <c10/util/intrusive_ptr.h>
#include <torch/csrc/autograd/edge.h>
#include <torch/csrc/autograd/function.h>

#include <memory>
#include <type_traits>

namespace symkernels {

template <typename T>
auto make_node() {
  using Owner = decltype(torch::autograd::Edge::function);
  if constexpr (std::is_same_v<Owner, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<T>();
  } else {
    return c10::make_intrusive<T>();
  }
}

}  // namespace symkernels
