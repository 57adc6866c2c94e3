"""Pod enrollment: finding local pods' netns and cgroups, and reconciling what is enrolled."""

from agent.enroll.enroller import Enroller, Enrollment, Pass
from agent.enroll.kubelet import KubernetesLocator
from agent.enroll.placement import LocateError, PodLocator, PodPlacement
from agent.enroll.testbed import TestbedLocator

__all__ = ["Enroller", "Enrollment", "KubernetesLocator", "LocateError", "Pass", "PodLocator",
           "PodPlacement", "TestbedLocator"]
